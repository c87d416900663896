"""`fingerprint demo`: the whole loop on this machine: sample data, a Ray sweep over detector kinds, MLflow,
promotion, predictions, report.

    fingerprint demo                                   # what `make demo` runs; a few minutes on 2 CPU cores
    fingerprint demo --weights-dir ../shared/weights   # start backbones that have an offline file from it

Steps, all under --out (default runs/demo):
  1. sample/: a benchmark made here (CT-like phantoms and a small generator that memorised a known half of the
     patients), never copied from elsewhere;
  2. a sweep over detector kinds (--presets) on an embedded local Ray: the seed's triplet fine-tuning per
     --backbones on Ray Train (2 workers), the label-free and cheap kinds as Ray tasks; every kind validated on
     the same held-out split, MLflow in mlflow.db (artifacts in mlartifacts/), each detector registered as a
     new version of fingerprint-sample (an MLflow pyfunc), the best by val_auc = challenger;
  3. promotion: challenger -> champion when it beats the champion on the same validation split;
  4. the champion's detector folder downloaded from the registry, `fingerprint predict` on the test part
     (real_unknown images), `fingerprint evaluate` against the sample's test_labels.csv, and the audit report
     (predict/report.html, with the registry version; logged to MLflow under the sweep run's audit/).
Run it again and finished work is reused: the data stays, the sweep is restored, promotion finds nothing to do.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fingerprint.commands.cli import Command
from fingerprint.config import flag, to_dict, validate

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Folder for everything the demo writes (data, MLflow store, Ray storage, reports, predictions)."""
    presets: str = "triplet,pixel_ncc,pixel_mass,subspace_mass,gradient_nn,gradient_cal,best"
    """Detectors to compare (fingerprint.detectors.PRESETS names, plus triplet and frozen per backbone)."""
    backbones: str = "resnet18"
    """Comma-separated timm backbones for the triplet (and frozen) detectors; one small one keeps the demo short."""
    weights: str = "none"
    """Starting weights for backbones without a file in --weights-dir: 'none' (random, offline) or 'hub'."""
    weights_dir: str = ""
    """Folder of offline weights named <backbone>.safetensors (e.g. ../shared/weights); empty = --weights."""
    image_size: int = 64
    """Image size for the sample data and the models."""
    epochs: int = 3
    """Epochs per trial."""
    triplets_per_epoch: int = 256
    """Triplets per epoch (split between the workers)."""
    num_workers: int = 2
    """Ray Train workers per trial."""
    patients: int = 30
    """Sample-data patients (half of them train the generator)."""
    seed: int = 0
    """Seed for the data, the split and training."""

    def problems(self) -> list[str]:
        out = []
        if not [p for p in self.presets.split(",") if p.strip()]:
            out.append(f"{flag('presets')}: give at least one detector")
        if not [b for b in self.backbones.split(",") if b.strip()]:
            out.append(f"{flag('backbones')}: give at least one timm model name")
        if self.weights not in ("none", "hub"):
            out.append(f"{flag('weights')}: 'none' or 'hub' (use --weights-dir for files)")
        if self.weights_dir and not Path(self.weights_dir).is_dir():
            out.append(f"{flag('weights_dir')}: '{self.weights_dir}' is not a folder")
        for name, low in (("image_size", 16), ("epochs", 1), ("triplets_per_epoch", 8), ("num_workers", 1),
                          ("patients", 5)):
            if getattr(self, name) < low:
                out.append(f"{flag(name)}: must be >= {low} (got {getattr(self, name)})")
        return out


@dataclass
class DemoResult:
    data: Path
    tracking_uri: str
    registered_model: str
    champion: str | None
    champion_kind: str
    detector: Path
    submission: Path
    metrics: dict[str, Any]
    seconds: float


def main(config: DemoConfig) -> DemoResult:
    """Run every step (reusing finished ones) and print where to look."""
    import mlflow

    from fingerprint.commands import evaluate, predict
    from fingerprint.data.phantoms import make_sample_dataset
    from fingerprint.report import write_audit
    from jobs import promote, registry, sweep
    from jobs.tracking import resolve_tracking_uri

    validate(config)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    t0 = time.perf_counter()
    out = Path(config.out).resolve()
    data = out / "sample"
    if not (data / "test_labels.csv").is_file():
        log.info("step 1/4: writing sample data to %s", data)
        make_sample_dataset(data, n_patients=config.patients, size=config.image_size, seed=config.seed,
                            n_reference_patients=config.patients, overwrite=data.exists())
    else:
        log.info("step 1/4: reusing sample data in %s", data)
    tracking_uri = resolve_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    model_name = "fingerprint-sample"

    log.info("step 2/4: sweep over %s (backbones %s)", config.presets, config.backbones)
    swept = sweep.main(sweep.SweepConfig(
        data=str(data), out=str(out / "sweep"), storage_path=str(out / "ray"), tracking_uri=tracking_uri,
        registered_model=model_name, experiment=model_name, presets=config.presets, backbones=config.backbones,
        weights=config.weights,
        weights_dir=config.weights_dir, image_size=config.image_size, embed_dim=64, epochs=config.epochs,
        triplets_per_epoch=config.triplets_per_epoch, batch_size=16, num_workers=config.num_workers,
        seed=config.seed, augment=True, checkpoints_to_keep=1,
    ))

    log.info("step 3/4: promotion")
    decision = promote.main(promote.PromoteConfig(model=model_name, metric="val_auc", require="val_f1",
                                                  tracking_uri=tracking_uri))
    mv = registry.get_alias(model_name, "champion")
    if mv is None:
        raise RuntimeError(f"no champion after promotion ({decision.reason}); see the sweep table above")

    kind = (mv.tags or {}).get("detector") or (mv.tags or {}).get("kind", "?")
    log.info("step 4/4: predict and evaluate with champion version %s (%s)", mv.version, kind)
    _, detector = registry.download_detector(model_name, "champion", out / "champion")
    submission = predict.main(predict.PredictConfig(model=str(detector), data=str(data), out=str(out / "predict")))
    metrics = evaluate.main(evaluate.EvaluateConfig(scores=str(out / "predict" / "scores.csv"),
                                                    labels=str(data / "test_labels.csv"), out=str(out / "evaluate"),
                                                    groups=str(data / "groups.csv"), n_boot=500, data=str(data)))
    # The audit report of the champion, with its registry version, kept beside the sweep in MLflow.
    report = write_audit(out / "predict", out / "predict" / "scores.jsonl", data, model=detector,
                         generator=f"the sample data's PCA generator ({data / 'README.md'})",
                         command="fingerprint demo", config=to_dict(config), n_boot=500,
                         registry={"name": model_name, "alias": "champion", "version": mv.version,
                                   "run_id": mv.run_id, "tracking_uri": tracking_uri})
    mlflow.MlflowClient(tracking_uri).log_artifact(swept.parent_run_id or mv.run_id, str(report), "audit")
    seconds = time.perf_counter() - t0
    db = tracking_uri.removeprefix("sqlite:///")
    val = registry.version_metrics(mv).get("val_auc", float("nan"))
    auc = metrics.get("auc", (float("nan"),))[0]
    print(f"""
Done in {seconds / 60:.1f} min. Champion: {model_name} version {mv.version}, {kind}: validation AUC {val:.3f}, \
test AUC {auc:.3f} ({len(swept.trials)} detectors compared on one validation split).
Where to look:
  sweep table         {out / 'sweep' / (swept.sweep_name + '.md')}
  per-trial outputs   {out / 'sweep'}/<trial>/  (detector folder; triplet: training curves, validation ROC, ...)
  champion            {model_name} version {mv.version}  ->  {detector}
  serve it            mlflow models serve -m models:/{model_name}@champion --env-manager local -h 127.0.0.1 \
(MLFLOW_TRACKING_URI={tracking_uri})
  predictions         {submission}  and  {out / 'predict' / 'scores.csv'}, evidence.png
  test metrics        {out / 'evaluate' / 'metrics.md'}
  audit report        {report}  (also in MLflow: the sweep run's artifacts, audit/)
  alias history       fingerprint promote --model {model_name} --tracking-uri {tracking_uri} --history
  MLflow UI           mlflow ui --backend-store-uri sqlite:///{db}   (then open http://127.0.0.1:5000)
  Ray checkpoints     {out / 'ray'}
""")
    return DemoResult(data, tracking_uri, model_name, mv.version, kind, detector, submission,
                      {k: v[0] for k, v in metrics.items()}, seconds)


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint demo`."""
    return Command(DemoConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("demo", command))
