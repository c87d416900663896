"""`fingerprint promote`: move the `champion` alias to the challenger only when it is better on the same split.

    fingerprint promote --model fingerprint-sample --metric val_auc --min-improvement 0.01 --require val_f1
    fingerprint promote --model fingerprint-sample --max-fpr-bound 0.1   # never a champion that may accuse more
    fingerprint promote --model fingerprint-sample --dry-run      # print the decision, change nothing
    fingerprint promote --model fingerprint-sample --history      # every recorded alias change

Versions may hold detectors of any kind (pixel, gradient, triplet, ...): they are compared on the validation
metrics recorded at registration, and every decision names the kinds it compared.

Rules, in order: the candidate (alias `challenger` unless --candidate names another alias or a version number)
must exist and carry --metric and every --require metric, and, with --max-fpr-bound below 1, a recorded
false-positive bound no higher than it; with no champion yet it becomes champion; otherwise both
versions must have been validated on the same locked split (hash of the validation ids recorded at registration),
and the candidate must beat the champion's --metric by more than zero and by at least --min-improvement. A
refusal prints which rule failed and the numbers behind it. Aliases only: registry stages are deprecated.

The alias moves in one registry call before anything else happens, so a failure never leaves the model without a
champion; the change (from, to, metrics, run ids, time) is then recorded in the model's alias history, which MLflow
itself does not keep.

Concurrent promotions. MLflow has no transactions across calls, so "decide, then move the alias" run by two
promoters at once let both move it, the later one possibly to the worse version. A promotion therefore takes the
registry-held lock of `jobs.registry.promotion_lock` (a registered-model tag, so it works with a sqlite file and
with a tracking server alike) and, holding it, re-reads the champion, decides again on that fresh state, checks the
lock is still ours, moves the alias, and re-reads the alias to confirm it points where we set it (a mismatch is
reported). A promoter that cannot take the lock within --lock-timeout seconds refuses and changes nothing. A
refusal and --dry-run need no lock: they change nothing, and a champion only ever gets better under the rules.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from fingerprint.commands.cli import Command
from fingerprint.config import Range, check_fields, flag, validate

log = logging.getLogger(__name__)


@dataclass
class PromoteConfig:
    model: str = ""
    """Registered model name (e.g. fingerprint-sample: 'fingerprint-<dataset folder>' by default in train-ray)."""
    metric: str = "val_auc"
    """Validation metric that decides (higher is better), as recorded with each version."""
    min_improvement: float = 0.0
    """How much the candidate must beat the champion's --metric by (absolute); it must always be strictly better."""
    require: str = ""
    """Comma-separated metrics the candidate must carry (e.g. val_f1,val_tpr_at_1fpr)."""
    candidate: str = "challenger"
    """Alias or version number of the version to promote."""
    champion: str = "champion"
    """Alias that serving and the demo load (jobs.registry.download_detector)."""
    dry_run: bool = False
    """Print the decision without moving any alias."""
    history: bool = False
    """Print the recorded alias changes of --model and stop."""
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI holding the registry (relative sqlite paths are relative to this folder)."""
    lock_timeout: float = 30.0
    """Seconds to wait for another promotion of the same model to finish before refusing."""
    max_fpr_bound: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    """Refuse a candidate whose threshold may wrongly flag more than this share of not-used images: the 95% upper
    bound recorded at fitting (tag fpr_bound). 1 = no limit. Below 1, a version registered without a bound is
    refused."""

    def required(self) -> list[str]:
        return [m.strip() for m in self.require.split(",") if m.strip()]

    def problems(self) -> list[str]:
        out = check_fields(self)
        if not self.model:
            out.append(f"{flag('model')}: required, the registered model name")
        if not self.metric:
            out.append(f"{flag('metric')}: required, e.g. val_auc")
        if not math.isfinite(self.min_improvement) or self.min_improvement < 0:
            out.append(f"{flag('min_improvement')}: must be a number >= 0 (got {self.min_improvement})")
        if not self.candidate:
            out.append(f"{flag('candidate')}: an alias (challenger) or a version number")
        if not self.champion or self.champion.isdigit():
            out.append(f"{flag('champion')}: an alias name such as champion")
        if self.candidate == self.champion:
            out.append(f"{flag('candidate')}: must differ from {flag('champion')}")
        if not self.tracking_uri:
            out.append(f"{flag('tracking_uri')}: required (e.g. sqlite:///mlflow.db)")
        if not math.isfinite(self.lock_timeout) or self.lock_timeout < 0:
            out.append(f"{flag('lock_timeout')}: must be a number of seconds >= 0 (got {self.lock_timeout})")
        return out


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate: str | None = None
    """Version number of the candidate (None when it could not be found)."""
    champion: str | None = None
    """Version number of the champion before the decision."""
    metrics: dict[str, Any] = field(default_factory=dict)
    applied: bool = False
    """True when the alias actually moved (not a dry run)."""
    warning: str = ""
    """Set when the alias, re-read after the move, did not point at the candidate (someone else moved it)."""


def label(mv: Any) -> str:
    """'v3 (pixel_ncc, kind pixel)': a version with the detector it holds, for decisions people read."""
    tags = mv.tags or {}
    kind, name = tags.get("kind"), tags.get("detector")
    if not kind:
        return f"v{mv.version} (kind unknown)"
    return f"v{mv.version} ({name}, kind {kind})" if name and name != kind else f"v{mv.version} ({kind})"


def decide(config: PromoteConfig) -> Decision:
    """The decision for the registry as it is now; changes nothing."""
    from mlflow.exceptions import MlflowException

    from jobs import registry

    if config.candidate.isdigit():
        try:
            cand = registry.get_version(config.model, config.candidate)
        except MlflowException:
            return Decision(False, f"refused: {config.model} has no version {config.candidate} "
                                   f"({registry.describe_model(config.model)})")
    else:
        cand = registry.get_alias(config.model, config.candidate)
        if cand is None:
            return Decision(False, f"refused: {config.model} has no alias '{config.candidate}' "
                                   f"({registry.describe_model(config.model)}); train with `fingerprint train-ray` or "
                                   "`fingerprint sweep`, which set it, or pass --candidate VERSION")
    champ = registry.get_alias(config.model, config.champion)
    cm = registry.version_metrics(cand)
    numbers: dict[str, Any] = {f"candidate_{config.metric}": cm.get(config.metric),
                               "candidate_run_id": cand.run_id, "candidate_kind": (cand.tags or {}).get("kind")}
    need = [config.metric, *config.required()]
    missing = [m for m in need if m not in cm or not math.isfinite(cm[m])]
    if missing:
        return Decision(False, f"refused: {label(cand)} lacks required metric(s) {missing} (it has "
                               f"{sorted(cm) or 'none'}); was it trained with validation (--val-fraction > 0)?",
                        cand.version, champ.version if champ else None, numbers)
    if config.max_fpr_bound < 1:
        bound = registry.version_fpr_bound(cand)
        numbers["candidate_fpr_bound"] = bound
        if bound is None or bound > config.max_fpr_bound:
            why = ("records no false-positive bound (registered before it was recorded: refit and register it)"
                   if bound is None else f"may wrongly flag up to {bound:.1%} of not-used images (95% bound at "
                   "fitting): label more not-used patients or use a stricter --threshold-method")
            return Decision(False, f"refused: {label(cand)} {why}; --max-fpr-bound is {config.max_fpr_bound:.1%}",
                            cand.version, champ.version if champ else None, numbers)
    if champ is None:
        return Decision(True, f"no '{config.champion}' yet: {label(cand)} becomes the first champion "
                              f"({config.metric}={cm[config.metric]:.4f})", cand.version, None, numbers)
    numbers.update({f"champion_{config.metric}": None, "champion_run_id": champ.run_id,
                    "champion_kind": (champ.tags or {}).get("kind")})
    if champ.version == cand.version:
        return Decision(False, f"nothing to do: {label(cand)} is already '{config.champion}'",
                        cand.version, champ.version, numbers)
    split_c, split_k = (cand.tags or {}).get(registry.SPLIT_TAG, ""), (champ.tags or {}).get(registry.SPLIT_TAG, "")
    if not split_c or split_c != split_k:
        return Decision(False, (
            f"refused: {label(cand)} and champion {label(champ)} were not validated on the same "
            f"locked split (split hashes {split_c[:12] or 'missing'} vs {split_k[:12] or 'missing'}); their "
            f"{config.metric} values are not comparable. Refit the candidate on the champion's data, --val-fraction "
            f"and --seed (each detector's meta.json records its split) before promoting"),
            cand.version, champ.version, numbers)
    km = registry.version_metrics(champ)
    numbers[f"champion_{config.metric}"] = km.get(config.metric)
    if config.metric not in km or not math.isfinite(km[config.metric]):
        return Decision(False, f"refused: champion {label(champ)} has no {config.metric} to compare with "
                               f"(it has {sorted(km) or 'none'}); choose another --metric",
                        cand.version, champ.version, numbers)
    gain = cm[config.metric] - km[config.metric]
    numbers["improvement"] = gain
    compare = (f"{config.metric} {cm[config.metric]:.4f} {label(cand)} vs {km[config.metric]:.4f} "
               f"{label(champ)}: {gain:+.4f}")
    if gain <= 0 or gain < config.min_improvement:
        need_txt = f"at least {config.min_improvement:g} and more than 0" if config.min_improvement else "more than 0"
        return Decision(False, f"refused: {compare}; the candidate must be better by {need_txt}",
                        cand.version, champ.version, numbers)
    return Decision(True, f"promote: {compare} (>= {config.min_improvement:g})", cand.version, champ.version, numbers)


def print_history(model: str) -> list[dict[str, Any]]:
    from fingerprint.evaluation.metrics import format_table
    from jobs import registry

    events = registry.alias_history(model)
    if not events:
        print(f"{model}: no alias change recorded yet")
        return events
    rows = [{"time": e.get("time"), "alias": e.get("alias"), "from": e.get("from_version") or "-",
             "to": e.get("to_version"), "reason": e.get("reason"),
             "metrics": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in (e.get("metrics") or {}).items() if not k.endswith("run_id")),
             "to_run": (e.get("to_run_id") or "")[:12]} for e in events]
    print(format_table(rows, ["time", "alias", "from", "to", "reason", "metrics", "to_run"]))
    return events


def main(config: PromoteConfig) -> Decision:
    """Decide, explain, and (unless --dry-run) move the champion alias with a recorded history entry."""
    import mlflow

    from jobs import registry
    from jobs.tracking import resolve_tracking_uri

    validate(config)
    mlflow.set_tracking_uri(resolve_tracking_uri(config.tracking_uri))
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_registered_model(config.model)
    except MlflowException as e:
        raise ValueError(f"--model: {registry.describe_model(config.model)} in {config.tracking_uri}") from e
    if config.history:
        print_history(config.model)
        return Decision(False, "history shown")
    decision = decide(config)
    if decision.promote and not config.dry_run:
        decision = promote_locked(config)
    prefix = "[dry run] " if config.dry_run else ""
    print(f"{prefix}{config.model}: {decision.reason}")
    if decision.applied:
        print(f"{config.model}: '{config.champion}' -> version {decision.candidate}"
              + (f" (was {decision.champion})" if decision.champion else ""))
    if decision.warning:
        print(f"{config.model}: WARNING {decision.warning}")
    return decision


def promote_locked(config: PromoteConfig) -> Decision:
    """Under the promotion lock: decide again on fresh state, move the alias, confirm where it points.

    Raises `jobs.registry.LockTimeout` (its message names --lock-timeout) when the lock cannot be had in time.
    """
    from jobs import registry

    with registry.promotion_lock(config.model, timeout=config.lock_timeout) as lock:
        decision = decide(config)  # the champion may have moved while we waited for the lock
        if not decision.promote:
            return decision
        lock.check()
        registry.set_alias(config.model, config.champion, decision.candidate, reason=decision.reason,
                           metrics={k: v for k, v in decision.metrics.items() if v is not None})
        decision.applied = True
        now = registry.get_alias(config.model, config.champion)
        if now is None or now.version != decision.candidate:
            decision.warning = (
                f"'{config.champion}' was set to version {decision.candidate} but now points at "
                f"{now.version if now is not None else 'nothing'}: another writer moved it without the "
                f"promotion lock; check `fingerprint promote --model {config.model} --history`")
            log.warning("%s: %s", config.model, decision.warning)
        return decision


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint promote`."""
    return Command(PromoteConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("promote", command))
