"""The audit report: one self-contained HTML file a data custodian reads before releasing synthetic images.

    from fingerprint.report import write_audit
    write_audit("runs/best/test/report.html", scores="runs/best/test", data="data/sample")

:func:`build_report` is a pure function of :class:`ReportInputs` (scores, decisions, labels, groups, neighbours,
images, summary, provenance); :func:`inputs_from_scores` gathers them from what `fingerprint predict` writes.
"""

from fingerprint.report.collect import (
    REPORT_FILE,
    inputs_from_scores,
    read_scores,
    write_audit,
    write_benchmark_audit,
)
from fingerprint.report.render import ReportInputs, build_report, write_report
from fingerprint.report.verdict import Evidence, Verdict, assess, judge

__all__ = ["REPORT_FILE", "Evidence", "ReportInputs", "Verdict", "assess", "build_report", "inputs_from_scores",
           "judge", "read_scores", "write_audit", "write_benchmark_audit",
           "write_report"]
