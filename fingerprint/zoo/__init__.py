"""A zoo of image generators with known training sets, for building membership-inference benchmarks.

Families (:mod:`fingerprint.zoo.base`) are registered by name: ``dcgan``, ``vae``, ``diffusion``, ``ae_gmm``.
:func:`fingerprint.zoo.build.build_benchmark` trains one on part of a pool of real images and writes a benchmark in
the shared layout (``fingerprint zoo``); :func:`fingerprint.zoo.build.build_suite` builds several from a YAML spec.
"""

from __future__ import annotations

from fingerprint.zoo.ae_gmm import AEGMM
from fingerprint.zoo.base import (
    Family,
    Generator,
    create_generator,
    families,
    family,
    is_generator_dir,
    load_generator,
    register_family,
    settings_help,
)
from fingerprint.zoo.dcgan import DCGAN
from fingerprint.zoo.diffusion import Diffusion
from fingerprint.zoo.vae import VAE

__all__ = [
    "AEGMM", "DCGAN", "VAE", "Diffusion", "Family", "Generator", "create_generator", "families", "family",
    "is_generator_dir", "load_generator", "register_family", "settings_help",
]
