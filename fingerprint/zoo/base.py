"""The generator protocol: every family fits, samples, saves and loads the same way.

    gen = create_generator("dcgan", {"steps": 2000})
    history = gen.fit(images, seed=0)                  # (N, H, W) float32 in [0, 1]; [{"step", "loss", ...}, ...]
    x = gen.sample(500, seed=1, temperature=1.0)       # (500, H, W) float32 in [0, 1]
    gen.save("runs/gen"); gen = load_generator("runs/gen")   # meta.json + weights.safetensors, no pickle

A *family* is a :class:`Generator` subclass registered under a name with :func:`register_family` (as detector
kinds are); its settings are a dataclass (``Settings``) whose field docstrings document it and whose
``Annotated[..., Range(...)]`` bounds are checked by :func:`create_generator`. Everything is deterministic on
CPU given the seed: fitting uses its own torch random stream (the global one is left as it was), sampling one
derived from its ``seed`` argument only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fingerprint.config import ConfigError, check_fields, field_docs, from_dict, to_dict
from fingerprint.io import atomic_dir, jsonable

__all__ = [
    "SCHEMA_VERSION", "Family", "Generator", "register_family", "families", "family", "create_generator",
    "load_generator", "is_generator_dir", "settings_help",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_FILE, WEIGHTS_FILE = "meta.json", "weights.safetensors"
History = list[dict[str, float]]
OnStep = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class Family:
    name: str
    cls: type[Generator]
    description: str


_FAMILIES: dict[str, Family] = {}


def register_family(name: str) -> Callable[[type[Generator]], type[Generator]]:
    """Class decorator: make a Generator subclass available as family ``name``."""

    def wrap(cls: type[Generator]) -> type[Generator]:
        if name in _FAMILIES and _FAMILIES[name].cls is not cls:
            raise ValueError(f"generator family {name!r} is registered twice ({_FAMILIES[name].cls} and {cls})")
        cls.family = name
        _FAMILIES[name] = Family(name, cls, " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()))
        return cls

    return wrap


def families() -> dict[str, Family]:
    """Every registered family by name."""
    return dict(_FAMILIES)


def family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError([f"--family: unknown generator family {name!r}; known: {', '.join(sorted(_FAMILIES))}"])
    return _FAMILIES[name]


def settings_problems(name: str, settings: Any) -> list[str]:
    """Problems of ``settings`` (a dict or the family's Settings) for family ``name``, each naming the setting."""
    cls = family(name).cls
    if isinstance(settings, dict):
        known = [f.name for f in dataclasses.fields(cls.Settings)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            return [f"--settings: unknown {name} setting(s) {', '.join(unknown)}; known: {', '.join(known)}"]
        try:
            settings = from_dict(cls.Settings, settings)
        except TypeError as e:
            return [f"--settings: {e}"]
    found = check_fields(settings)
    if not found and hasattr(settings, "problems"):  # rules across fields, e.g. "a multiple of 4"
        found = settings.problems()
    return [f"--settings: {name}.{p.removeprefix('--').replace('-', '_')}" for p in found]


def create_generator(name: str, settings: Any = None) -> Generator:
    """An unfitted generator of family ``name``; ``settings`` is its Settings, a dict of them, or None (defaults).

    Raises ConfigError naming ``--family`` for an unknown family and ``--settings`` for bad settings.
    """
    cls = family(name).cls
    if settings is None:
        settings = cls.Settings()
    problems = settings_problems(name, settings)
    if problems:
        raise ConfigError(problems)
    if isinstance(settings, dict):
        settings = from_dict(cls.Settings, settings)
    return cls(settings)


def settings_help(name: str) -> dict[str, str]:
    """Field docstrings of a family's Settings."""
    return field_docs(family(name).cls.Settings)


# ------------------------------------------------------------------------------------------------ base


class Generator:
    """An image generator family. Subclasses set ``Settings`` and implement ``_build``, ``_fit``, ``_sample``."""

    family: ClassVar[str] = ""
    Settings: ClassVar[type] = type(None)

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.image_size: int | None = None
        self.extra: dict[str, Any] = {}
        """Family-specific facts worth keeping (e.g. the number of mixture components actually fitted)."""

    # -- what a family implements

    def _build(self, image_size: int) -> None:
        """Create the (untrained) modules for square images of side ``image_size``."""
        raise NotImplementedError

    def _fit(self, x: np.ndarray, torch_gen: Any, seed: int, progress: bool, on_step: OnStep | None) -> History:
        raise NotImplementedError

    def _sample(self, n: int, torch_gen: Any, rng: np.random.Generator, temperature: float) -> np.ndarray:
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """What sampling needs, as named arrays (weights, mixture parameters)."""
        raise NotImplementedError

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    @classmethod
    def check_size(cls, image_size: int) -> str | None:
        """Why the family cannot model ``image_size`` x ``image_size`` images, or None."""
        if image_size < 16 or image_size & (image_size - 1):
            return f"image size must be a power of two >= 16 (16, 32, 64, 128), got {image_size}"
        return None

    # -- shared

    def fit(self, images: np.ndarray, seed: int = 0, progress: bool = False,
            on_step: OnStep | None = None) -> History:
        """Train on ``images`` ((N, H, W) float32 in [0, 1], H == W); returns the history of logged steps."""
        import torch

        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 3 or x.shape[1] != x.shape[2] or len(x) < 2:
            raise ValueError(f"images must have shape (N >= 2, S, S), got {x.shape}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"images must lie in [0, 1], got [{x.min()}, {x.max()}]")
        why = self.check_size(x.shape[1])
        if why:
            raise ValueError(f"{self.family}: {why}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_torch_seed(seed, 0))
            self._build(x.shape[1])
            self.image_size = int(x.shape[1])
            torch_gen = torch.Generator().manual_seed(_torch_seed(seed, 1))
            return self._fit(x, torch_gen, seed, progress, on_step)

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """``n`` images, ``(n, H, W)`` float32 in [0, 1]; the same seed gives the same images."""
        import torch

        if self.image_size is None:
            raise RuntimeError(f"{self.family}: sample() called before fit() or load_generator()")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if n == 0:
            return np.zeros((0, self.image_size, self.image_size), dtype=np.float32)
        torch_gen = torch.Generator().manual_seed(_torch_seed(seed, 2))
        rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
        with torch.no_grad():
            out = self._sample(n, torch_gen, rng, float(temperature))
        return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)

    def save(self, path: str | Path) -> Path:
        """Write meta.json and weights.safetensors to ``path`` atomically."""
        from safetensors.numpy import save_file

        if self.image_size is None:
            raise RuntimeError(f"{self.family}: nothing to save before fit()")
        path = Path(path)
        meta = {"family": self.family, "settings": to_dict(self.settings), "image_size": self.image_size,
                "extra": self.extra, "schema_version": SCHEMA_VERSION}
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays().items()}
        with atomic_dir(path) as tmp:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=jsonable) + "\n")
            save_file(arrays, str(tmp / WEIGHTS_FILE), metadata={"family": self.family})
        return path


def is_generator_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / META_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_generator(path: str | Path) -> Generator:
    """A saved generator of any family, ready to sample."""
    import torch
    from safetensors.numpy import load_file

    path = Path(path)
    if not is_generator_dir(path):
        raise FileNotFoundError(f"{path}: not a saved fingerprint generator (needs {META_FILE} and {WEIGHTS_FILE})")
    meta = json.loads((path / META_FILE).read_text())
    if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ValueError(f"{path}: saved by a newer fingerprint (schema {meta['schema_version']} > {SCHEMA_VERSION})")
    gen = create_generator(meta["family"], meta["settings"])
    with torch.random.fork_rng(devices=[]):
        gen._build(int(meta["image_size"]))
    gen.image_size = int(meta["image_size"])
    gen.extra = dict(meta.get("extra", {}))
    gen.load_arrays(load_file(str(path / WEIGHTS_FILE)))
    return gen


# ------------------------------------------------------------------------------------------------ helpers


def _torch_seed(seed: int, stream: int) -> int:
    """A 63-bit torch seed for one of the independent streams derived from ``seed``."""
    return int(np.random.SeedSequence([int(seed) % 2**63, stream]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def batches(n: int, batch_size: int, steps: int, torch_gen: Any) -> Iterator[Any]:
    """``steps`` index batches: epochs of seeded permutations of ``range(n)``; a batch never spans two epochs."""
    import torch

    bs = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=torch_gen), 0
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=torch_gen), 0
        yield perm[pos : pos + bs]
        pos += bs


class Recorder:
    """Averages per-step losses over logging intervals into the history (about 100 records per run)."""

    def __init__(self, family_name: str, steps: int, progress: bool, on_step: OnStep | None) -> None:
        self.name, self.steps, self.progress, self.on_step = family_name, steps, progress, on_step
        self.every = max(1, steps // 100)
        self.history: History = []
        self.sums: dict[str, float] = {}
        self.count = 0
        self.start = time.perf_counter()

    def add(self, step: int, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if step % self.every == 0 or step == self.steps:
            rec = {"step": float(step), **{k: v / self.count for k, v in self.sums.items()},
                   "seconds": round(time.perf_counter() - self.start, 3)}
            rec["step"] = int(step)  # type: ignore[assignment]
            self.history.append(rec)
            self.sums, self.count = {}, 0
            if self.on_step is not None:
                self.on_step(rec)
            if self.progress and (len(self.history) % 10 == 0 or step == self.steps):
                log.info("%s step %d/%d: %s", self.name, step, self.steps,
                         ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step"))


def module_arrays(prefix: str, module: Any) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_module_arrays(prefix: str, module: Any, arrays: dict[str, np.ndarray]) -> None:
    import torch

    state = {k[len(prefix) + 1:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
             if k.startswith(prefix + ".")}
    module.load_state_dict(state)
