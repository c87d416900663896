"""Typed, validated configuration shared by the CLI, the Ray jobs and the serving app.

Each field carries a docstring right under it (as in litgpt); `field_docs` reads those docstrings from the
source so that `fingerprint <command> --help` explains every flag from the same text a reader of this file sees.
Validation collects every problem first and raises once, naming the flags.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """One or more configuration problems; the message lists each with its flag."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


BENCHMARK_HINT = "a benchmark folder such as ../shared/bench/ctbench-s1"


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"
    """Any timm model name (e.g. resnet18, mobilenetv2_100, tf_efficientnet_lite0, inception_v3, resnet50)."""
    weights: str = "hub"
    """Pretrained weights: a local timm state-dict file (.safetensors/.pth/.bin), 'hub' to download timm's default
    weights (needs the model hub to be reachable), or 'none' for random initialisation."""
    embed_dim: Annotated[int, Range(2)] = 128
    """Dimension of the L2-normalised embedding produced by the projection head."""
    image_size: Annotated[int | None, Range(16)] = None
    """Square input size in pixels; None keeps the model's own (timm data config). Smaller is much faster on CPU."""
    in_chans: Literal[1, 3] = 1
    """Input channels: 1 feeds gray images to a first conv whose RGB kernels are summed (timm), 3 replicates gray."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        if not self.backbone:
            out.append(f"{flag('backbone')}: give a timm model name, e.g. resnet18")
        if self.weights not in ("hub", "none") and not Path(self.weights).is_file():
            out.append(
                f"{flag('weights')}: file '{self.weights}' does not exist; give a local timm state dict "
                "(e.g. ../shared/weights/tf_efficientnet_lite0.safetensors), 'hub' or 'none'"
            )
        return out


@dataclass
class DecisionConfig:
    """How a fitted detector turns scores into decisions (`fit`, `train` and the Ray jobs share it)."""

    threshold_method: Literal["max_f1", "fpr", "fpr_bound"] = "fpr"
    """Decision threshold from the training labels. 'fpr' (default): flag only images scoring above all but
    --target-fpr of the labelled not-used images, so the share of innocent images wrongly flagged is what is set.
    'fpr_bound': stricter, --target-fpr is a 95% upper confidence bound counted over pseudo-patient groups, so a
    small labelled set gives a high threshold (or an error naming how many not-used groups it needs). 'max_f1'
    maximises F1 (the ImageCLEF 2023 metric); where memorisation is weak, the best F1 is reached by flagging
    nearly every image, innocent ones included. Whichever is chosen, the fitted detector records the bound its threshold
    reaches."""
    target_fpr: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.05
    """Target false-positive rate for --threshold-method fpr and fpr_bound."""


@dataclass
class ScoreConfig(DecisionConfig):
    k: Annotated[int, Range(1)] = 5
    """Number of nearest generated images whose mean similarity makes a real image's membership score."""
    calibrate: bool = False
    """Subtract each image's similarity to its k nearest other real images (a k-NN density ratio). Off by default:
    on ctbench-s0 it hurt, because the real pool holds other training images that cluster together."""

    def problems(self) -> list[str]:
        return check_fields(self)


@dataclass
class TrainConfig(ScoreConfig, ModelConfig):
    data: str = ""
    """Benchmark folder: with dev/ and test/ subfolders (ImageCLEF layout), or a single labelled dev folder or
    manifest CSV. Dev generated images are anchors, used images positives, not-used images negatives; test
    generated images (if any) are extra anchors."""
    out: str = "runs/train"
    """Output folder for the detector, the training checkpoint, metrics and pictures."""
    epochs: Annotated[int, Range(1)] = 5
    """Passes over --triplets-per-epoch triplets."""
    triplets_per_epoch: Annotated[int, Range(1)] = 512
    """Triplets drawn (seeded) per epoch; anchors are balanced between dev and test generated images."""
    val_gallery_size: Annotated[int, Range(0)] = 2048
    """Generated images the per-epoch validation indexes (a seeded sample, the same every epoch; 0 = all): rank 0
    validates while the other workers wait, so its cost must not grow with the gallery. The final detector
    indexes every generated image."""
    batch_size: Annotated[int, Range(1)] = 32
    """Triplets per optimisation step (per worker when distributed)."""
    lr: Annotated[float, Range(0, lo_open=True)] = 1e-4
    """AdamW learning rate for the backbone; the head uses 10x."""
    weight_decay: Annotated[float, Range(0)] = 1e-4
    """AdamW weight decay."""
    margin: Annotated[float, Range(0, lo_open=True)] = 0.5
    """Triplet margin alpha in Eq. (1): max(||a-p||^2 - ||a-n||^2 + alpha, 0) on L2-normalised embeddings."""
    mining: Literal["none", "batch_hard", "semi_hard"] = "none"
    """Triplet selection: 'none' uses the sampled triplets as they are (the seed's scheme); 'batch_hard' and
    'semi_hard' re-pair each anchor with positives and negatives mined within the batch."""
    augment: bool = True
    """Augment positives (flips, small rotations, crops, brightness), as in the seed notebook."""
    val_fraction: Annotated[float, Range(0, 0.9, hi_open=True)] = 0.25
    """Fraction of labelled dev images (whole groups) held out for validation each epoch; 0 disables."""
    seed: int = 0
    """Seed for splits, triplet sampling, augmentation and initialisation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: 'auto' picks CUDA when available."""
    amp: bool = True
    """Mixed precision (bfloat16 autocast) on CUDA; ignored on CPU."""
    loader_workers: Annotated[int, Range(0)] = 0
    """DataLoader worker processes (0 loads in the training process, best on 2-core machines)."""
    skip_bad: bool = False
    """Skip unreadable image files (listed in the log) instead of stopping at the first one."""

    def problems(self) -> list[str]:
        # check_fields (in ModelConfig.problems) covers every field, inherited ones included.
        return ModelConfig.problems(self) + path_problems(self, "data", BENCHMARK_HINT)


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, given as ``Annotated[int, Range(1)]``: checked by :func:`check_fields`."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, value: float) -> str | None:
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        above = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if not (below or above):
            return None
        if self.lo is not None and self.hi is not None:
            return (f"must be in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
                    f" (got {value})")
        if self.lo is not None:
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g} (got {value})"
        return f"must be {'<' if self.hi_open else '<='} {self.hi:g} (got {value})"


def check_fields(config: Any) -> list[str]:
    """Problems derived from the field types alone: Literal choices, Range bounds, int/float/bool/str kinds."""
    out = []
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in fields(config):
        value = getattr(config, f.name)
        tp, bounds = hints[f.name], []
        if typing.get_origin(tp) is typing.Annotated:
            tp, *meta = typing.get_args(tp)
            bounds = [m for m in meta if isinstance(m, Range)]
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (types.UnionType, typing.Union) and type(None) in args:
            if value is None:
                continue
            tp = next(a for a in args if a is not type(None))
        problem = None
        if typing.get_origin(tp) is Literal:
            if value not in typing.get_args(tp):
                problem = f"one of {', '.join(map(str, typing.get_args(tp)))} (got {value!r})"
        elif tp is bool:
            if not isinstance(value, bool):
                problem = f"must be true or false (got {value!r})"
        elif tp in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or (tp is int and not float(
                    value).is_integer()):
                problem = f"must be {'an integer' if tp is int else 'a number'} (got {value!r})"
            else:
                problem = next((p for p in (b.problem(value) for b in bounds) if p), None)
        elif tp is str and not isinstance(value, str):
            problem = f"must be a string (got {value!r})"
        if problem:
            out.append(f"{flag(f.name)}: {problem}")
    return out


def path_problems(config: Any, name: str, what: str) -> list[str]:
    """A required path field: missing, or naming nothing on disk, is a problem that says what to give."""
    value = getattr(config, name)
    if not value:
        return [f"{flag(name)}: required, {what}"]
    if not Path(value).exists():
        return [f"{flag(name)}: '{value}' does not exist; give {what}"]
    return []


def validate(config: Any) -> Any:
    """Raise ConfigError listing every problem of `config` (each naming its flag); return it unchanged if fine."""
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    return config


def subset(cls: type[C], config: Any) -> C:
    """The part of `config` that `cls` describes, e.g. the ModelConfig of a TrainConfig."""
    return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build `cls` from a dict, ignoring keys it does not know (older or newer checkpoints)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def save_json(config: Any, path: str | Path) -> Path:
    from fingerprint.io import write_text_atomic

    return write_text_atomic(path, json.dumps(to_dict(config), indent=2, sort_keys=True))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under each field) for `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_optional(inner: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else inner(text)

    parse.__name__ = inner.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field, with its docstring as help and its default shown."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # argparse %-formats help text; the formatter adds the default itself.
        kwargs: dict[str, Any] = {"default": default, "help": docs.get(f.name, "").replace("%", "%%")}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(args)
            kwargs["type"] = type(args[0])
        elif origin in (types.UnionType, typing.Union) and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            kwargs["type"] = _parse_optional(inner)
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {tp}")
        parser.add_argument(flag(f.name), dest=f.name, **kwargs)


def from_args(cls: type[C], namespace: argparse.Namespace) -> C:
    values = vars(namespace)
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})  # type: ignore[call-arg]
