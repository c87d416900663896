"""Regenerate the README's example report and its screenshot from the bundled sample data.

    python -m fingerprint.report.example docs/            # docs/example-report.html and docs/report.png

The same steps as the README's commands: `fingerprint sample-data --memorisation 0.5` (a generator that copies
less than the default 0.9), `fingerprint fit --preset gradient_nn`, `fingerprint predict` on the test part, whose
labels (test_labels.csv) give the verdict.
The screenshot needs Playwright and Chromium (the dev extra, `make test` installs Chromium); --no-screenshot
skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from pathlib import Path

from fingerprint.commands import fit, predict, sample_data
from fingerprint.report.collect import write_audit

REPORT = "example-report.html"
SCREENSHOT = "report.png"
CHROMIUM = os.environ.get("FINGERPRINT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def make_example(out: str | Path, preset: str = "gradient_nn", memorisation: float = 0.5, seed: int = 0) -> Path:
    """Sample data, a fitted detector and its predictions in a temporary folder; the report written to
    ``<out>/example-report.html``. Paths in the report are relative to that folder (``sample``, ``det``).

    The generator memorises less than the sample data's default (0.9, where every number is 100% [100%, 100%]),
    so that the report shows intervals of some width."""
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="fingerprint-example-") as tmp, contextlib.chdir(tmp):
        sample_data.main(sample_data.SampleDataConfig(out="sample", memorisation=memorisation, seed=seed))
        fit.main(fit.FitConfig(data="sample", preset=preset, out="det", seed=seed))
        predict.main(predict.PredictConfig(model="det", data="sample", out="pred"))
        return write_audit(out / REPORT, "pred/scores.jsonl", "sample", model="det", seed=seed,
                           generator="the sample data's PCA generator, fitted on the used patients' slices "
                                     f"(memorisation {memorisation}; sample/README.md)",
                           command="python -m fingerprint.report.example docs/")


def screenshot(report: str | Path, png: str | Path, width: int = 1280, height: int = 900) -> Path:
    """The top of ``report`` as Chromium shows it (``width`` x ``height``), written to ``png``."""
    from playwright.sync_api import sync_playwright

    png = Path(png)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(Path(report).resolve().as_uri())
            page.screenshot(path=str(png), full_page=False)
        finally:
            browser.close()
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", help="folder for example-report.html and report.png (e.g. docs/)")
    parser.add_argument("--no-screenshot", action="store_true", help="write the report only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = make_example(args.out)
    print(f"wrote {report} ({report.stat().st_size / 1e6:.2f} MB)")
    if not args.no_screenshot:
        print(f"wrote {screenshot(report, Path(args.out) / SCREENSHOT)}")


if __name__ == "__main__":
    main()
