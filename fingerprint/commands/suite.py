"""`fingerprint suite`: choose a detector across a suite of benchmarks, reported leave-one-benchmark-out.

    fingerprint suite --suite benchmarks/zoo --extra ../shared/bench/ctbench-s0 --out benchmarks/suite

Every candidate is cross-validated on every benchmark's dev labels and scored on its test images; for each
benchmark, the candidate chosen on the *other* benchmarks is reported with its dev-CV AUC beside its test AUC, so
the optimism of tuning on one benchmark shows. The candidate chosen on the whole suite writes a submission for each
--extra benchmark. See :mod:`fingerprint.evaluation.suite`.
"""

from __future__ import annotations

from typing import Any

from fingerprint.evaluation.suite import SuiteConfig, run

__all__ = ["SuiteConfig", "main"]


def main(config: SuiteConfig) -> dict[str, Any]:
    """Run the suite, print suite.md and return the results (as written to suite.json)."""
    result = run(config)
    print(result["markdown"])
    return result
