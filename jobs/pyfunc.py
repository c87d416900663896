"""The MLflow pyfunc model of a saved fingerprint detector (any kind): images in, scores with evidence out.

Logged by `jobs.registry.log_detector` as a *model from code*: MLflow stores this file (not a pickle) and runs
it at load time; the detector folder travels as the artifact ``detector`` and the `fingerprint` package as code.

Input: a DataFrame with columns

    id     str   the image's id (an id of the detector's reference pool is never compared with itself)
    image  str   the PNG or JPEG file, base64-encoded

Output: a DataFrame with one row per input row, in order:

    id                    str
    score                 float   higher = more likely in the generator's training set
    decision              int     1 when score >= threshold
    threshold             float   the detector's decision threshold
    nearest_ids           str     JSON list: ids of the nearest generated images, most similar first
    nearest_similarities  str     JSON list of their similarities (in the kind's feature space)

The evidence lists are JSON strings: MLflow's column types hold them in any pandas / JSON transport (a list
column does not survive every `mlflow models serve` response format), and ``json.loads`` gives the lists back.

    model = mlflow.pyfunc.load_model("models:/fingerprint-sample@champion")
    model.predict(pd.DataFrame({"id": ["a"], "image": [base64.b64encode(png_bytes).decode()]}))
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

INPUT_COLUMNS = ("id", "image")
OUTPUT_COLUMNS = ("id", "score", "decision", "threshold", "nearest_ids", "nearest_similarities")


def encode_image(data: bytes) -> str:
    """The ``image`` column's value for a PNG/JPEG file's bytes."""
    return base64.b64encode(data).decode("ascii")


def decode_image(value: Any, row_id: str) -> Any:
    """A base64 PNG/JPEG as the library decodes files: fully loaded, then `fingerprint.data.images.to_gray8`."""
    from PIL import Image

    from fingerprint.data.images import IMAGE_FORMATS, to_gray8

    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        try:
            raw = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"row {row_id!r}: 'image' is not valid base64 ({e})") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.format not in IMAGE_FORMATS:
                raise ValueError(f"is a {im.format} image; only PNG and JPEG are supported")
            return to_gray8(im)
    except Exception as e:  # PIL raises many types
        raise ValueError(f"row {row_id!r}: not a readable PNG/JPEG image ({type(e).__name__}: {e})") from e


class DetectorModel(PythonModel):
    """A fingerprint detector (any kind) behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from fingerprint.detectors import load_detector

        self.detector = load_detector(context.artifacts["detector"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = pd.DataFrame(model_input)
        missing = [c for c in INPUT_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"input needs columns {list(INPUT_COLUMNS)}; missing {missing} (got {list(df.columns)})")
        ids = [str(i) for i in df["id"]]
        if not ids:
            return pd.DataFrame({c: [] for c in OUTPUT_COLUMNS})
        images = [decode_image(v, i) for v, i in zip(df["image"], ids, strict=True)]
        det = self.detector
        scores = det.score(images, ids)
        decisions = det.decide(scores)
        gallery = det.gallery_ids
        return pd.DataFrame({
            "id": ids,
            "score": scores.score.astype(float),
            "decision": decisions.astype("int64"),
            "threshold": [det.threshold] * len(ids),
            "nearest_ids": [json.dumps([gallery[j] for j in row if j >= 0]) for row in scores.nearest],
            "nearest_similarities": [json.dumps([float(s) for s, j in zip(sims, row, strict=True) if j >= 0])
                                     for sims, row in zip(scores.nearest_similarity, scores.nearest, strict=True)],
        })


mlflow.models.set_model(DetectorModel())
