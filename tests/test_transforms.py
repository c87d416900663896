"""Preprocess: the split pipeline (per-image pixels, per-batch normalisation) equals timm's pipeline exactly."""

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from fingerprint.features.transforms import Preprocess

GRAY = {"input_size": [1, 64, 64], "interpolation": "bicubic", "mean": [0.5], "std": [0.5], "crop_pct": 0.875,
        "crop_mode": "center"}
RGB = {"input_size": [3, 48, 48], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
       "std": [0.229, 0.224, 0.225], "crop_pct": 0.9, "crop_mode": "squash"}


def _images(n: int = 7) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # Different sizes and aspect ratios, so resize and crop really do something.
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 70 - 3 * i), dtype=np.uint8), mode="L")
            for i in range(n)]


@pytest.mark.parametrize("data_config", [GRAY, RGB], ids=["gray", "rgb"])
def test_batch_equals_timm_pipeline_bit_for_bit(data_config):
    tf = Preprocess(data_config)
    timm_tf = create_transform(**data_config, is_training=False)
    images = _images()
    expected = torch.stack([timm_tf(im.convert(tf.mode)) for im in images])
    got = tf.batch(images)
    assert got.shape == (len(images), *data_config["input_size"])
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert torch.equal(tf(images[3]), expected[3])


def test_pixels_are_uint8_and_finish_normalises_with_the_data_config():
    tf = Preprocess(GRAY)
    px = tf.pixels(_images(1)[0])
    assert px.dtype == torch.uint8 and px.shape == (1, 64, 64)
    out = tf.finish(px[None])
    assert torch.allclose(out, (px[None].float() / 255 - 0.5) / 0.5)
    # Other statistics in the data config give other values: nothing is hard-coded.
    other = Preprocess({**GRAY, "mean": [0.2], "std": [0.1]})
    assert torch.allclose(other.finish(px[None]), (px[None].float() / 255 - 0.2) / 0.1)


def test_finish_leaves_the_pixels_untouched():
    tf = Preprocess(GRAY)
    px = torch.stack([tf.pixels(im) for im in _images(3)])
    before = px.clone()
    tf.finish(px)
    assert torch.equal(px, before)


def test_augmented_batches_keep_shape_and_vary():
    tf = Preprocess(GRAY, augment=True)
    im = _images(1)[0]
    torch.manual_seed(0)
    a, b = tf.batch([im, im])
    assert a.shape == (1, 64, 64) and not torch.equal(a, b)
