"""Bulk embedding and scoring with Ray Data (`fingerprint embed`, `fingerprint score-ray`) and the stored index
they share with `fingerprint predict`: on the sample benchmark, the numbers equal local `predict`'s."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ray_fixtures import ray_local  # noqa: F401  (fixture)

from fingerprint.detectors import fit_detector, load_detector
from fingerprint.index_store import (
    ShardWriter,
    StoredIndexError,
    detector_digest,
    read_index,
    use_index,
    write_manifest,
)

FROZEN = {"backbone": "resnet18", "weights": "none", "image_size": 32, "device": "cpu", "k": 3, "batch_size": 16}


@pytest.fixture(scope="module")
def frozen_detector(sample_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fingerprint.data.imagesets import load_fit_data

    det = fit_detector("frozen", FROZEN, load_fit_data(sample_bench, 0.25, 0))
    return det.save(tmp_path_factory.mktemp("scale") / "frozen")


def _jsonl(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.mark.ray
def test_embed_predict_and_score_ray_agree(ray_local, sample_bench, frozen_detector, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from fingerprint.commands import predict
    from jobs import embed_ray, score_ray

    det_dir = tmp_path / "det"
    shutil.copytree(frozen_detector, det_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("fp-scale")
    mv = client.create_model_version("fp-scale", source=str(det_dir))

    # Local predict without any stored index: the reference numbers.
    plain = predict.main(predict.PredictConfig(model=str(frozen_detector), data=str(sample_bench),
                                               out=str(tmp_path / "plain"), evidence=0))
    want = _jsonl(plain.parent / "scores.jsonl")

    index = embed_ray.main(embed_ray.EmbedConfig(
        model=str(det_dir), data=str(sample_bench), workers=2, batch_size=16, shard_rows=40, gpu="no",
        tracking_uri=uri, experiment="fp-index", registered_model="fp-scale", model_version=str(mv.version)))
    assert index == det_dir / "index"
    stored = read_index(index)
    det = load_detector(det_dir)
    assert stored.manifest.detector_sha256 == detector_digest(det_dir)
    assert stored.manifest.model_version == str(mv.version) and stored.manifest.search == "exact"
    assert [s.rows for s in stored.manifest.gallery] == [40, 40, 16]
    assert stored.gallery_ids == det.gallery_ids  # the order the files were listed in
    np.testing.assert_allclose(stored.gallery, det.arrays()["gallery"], rtol=1e-5, atol=1e-5)
    # MLflow knows which version made which index.
    tag = json.loads(client.get_model_version("fp-scale", mv.version).tags[embed_ray.INDEX_TAG])
    assert tag["path"] == str(index.resolve()) and tag["gallery_size"] == 96
    run = client.get_run(tag["run_id"])
    assert run.data.params["detector_sha256"] == stored.manifest.detector_sha256

    # predict finds <detector>/index by itself; the Ray Data batch job reads the same index.
    auto = predict.main(predict.PredictConfig(model=str(det_dir), data=str(sample_bench),
                                              out=str(tmp_path / "auto"), evidence=0))
    bulk = score_ray.main(score_ray.ScoreRayConfig(model=str(det_dir), data=str(sample_bench),
                                                   out=str(tmp_path / "bulk"), workers=2, batch_size=7, gpu="no"))
    for got in (_jsonl(auto.parent / "scores.jsonl"), _jsonl(bulk.parent / "scores.jsonl")):
        assert list(got) == list(want)
        for i, row in want.items():
            assert got[i]["score"] == pytest.approx(row["score"], abs=1e-5)
            assert got[i]["decision"] == row["decision"]
            assert got[i]["nearest_ids"] == row["nearest_ids"]
    assert bulk.read_text() == plain.read_text()  # the ImageCLEF submission, line for line
    assert (bulk.parent / "scores.csv").read_text().splitlines()[0] == \
        (plain.parent / "scores.csv").read_text().splitlines()[0]

    # A service replica loads the stored index at start-up, reading no image.
    from serve.config import ServeConfig
    from serve.model import load_state

    state = load_state(ServeConfig(detector=str(det_dir), trace=False))
    assert state.info["gallery_source"] == "stored index" and state.detector.gallery_ids == stored.gallery_ids

    # An approximate index elsewhere, named with --index.
    ivf = embed_ray.main(embed_ray.EmbedConfig(model=str(det_dir), data=str(sample_bench), out=str(tmp_path / "ivf"),
                                               approximate="ivf", workers=1, gpu="no"))
    assert read_index(ivf).manifest.search == "ivf" and (ivf / "gallery.faiss").is_file()
    approx = predict.main(predict.PredictConfig(model=str(det_dir), data=str(sample_bench), index=str(ivf),
                                                out=str(tmp_path / "approx"), evidence=0))
    got = _jsonl(approx.parent / "scores.jsonl")
    assert set(got) == set(want)
    assert all(got[i]["score"] <= want[i]["score"] + 1e-5 for i in want)  # never closer than the exact top-k


def test_stored_index_round_trip_and_refusals(sample_bench, frozen_detector, tmp_path):
    from fingerprint.data.images import load_image
    from fingerprint.index_store import IndexManifest

    images = [load_image(f) for f in sorted((sample_bench / "dev" / "used").glob("*.png"))[:6]]

    det = load_detector(frozen_detector)
    vectors = det.arrays()["gallery"]
    folder = tmp_path / "index"
    folder.mkdir()
    writer = ShardWriter(folder, "gallery", shard_rows=50)
    for start in range(0, len(vectors), 30):  # batches that do not line up with shards
        writer.add(det.gallery_ids[start:start + 30], vectors[start:start + 30])
    shards = writer.close()
    assert [s.rows for s in shards] == [50, len(vectors) - 50]
    manifest = IndexManifest(detector_sha256=detector_digest(frozen_detector), kind=det.kind, metric=det.metric,
                             dim=vectors.shape[1], gallery=shards)
    write_manifest(folder, manifest)
    own = load_detector(frozen_detector).score(images)
    stored = use_index(det, frozen_detector, folder)
    assert det.gallery_ids == stored.gallery_ids and len(det.gallery) == len(vectors)
    np.testing.assert_array_equal(stored.gallery, vectors)
    # Cosine: the detector keeps the search's unit rows, not a second copy of the gallery; scores are unchanged.
    assert det.metric == "cosine" and np.shares_memory(det._gallery_features, det.gallery.vectors.numpy())
    got = det.score(images)
    np.testing.assert_allclose(got.score, own.score, atol=1e-5)
    np.testing.assert_array_equal(got.nearest, own.nearest)

    # Another detector's index is refused, naming what to do.
    write_manifest(folder, IndexManifest(**{**manifest.__dict__, "detector_sha256": "0" * 64}))
    with pytest.raises(StoredIndexError, match="rerun `fingerprint embed"):
        use_index(det, frozen_detector, folder)
    write_manifest(folder, manifest)
    (folder / shards[1].vectors).unlink()
    with pytest.raises(StoredIndexError, match="missing"):
        read_index(folder)
    with pytest.raises(StoredIndexError, match="no stored index"):
        read_index(tmp_path)


def test_epoch_validation_indexes_a_bounded_gallery_the_final_detector_all(sample_bench, tiny_train_kwargs):
    from fingerprint.config import ModelConfig, TrainConfig, subset
    from fingerprint.detectors.triplet import training

    config = TrainConfig(data=str(sample_bench), val_fraction=0.25, val_gallery_size=10, **tiny_train_kwargs)
    data = training.load_training_data(config)
    model, data_cfg = training.build_model(subset(ModelConfig, config))
    val = training.validate(model, data, config, data_cfg)
    assert val is not None and val.gallery_sampled and len(val.detector.gallery_ids) == 10
    assert set(val.detector.gallery_ids) <= set(data.gallery_ids)
    # The same sample every epoch (seeded), so epochs are compared on one gallery.
    again = training.validate(model, data, config, data_cfg)
    assert again.detector.gallery_ids == val.detector.gallery_ids
    result = training.FitResult(model, data_cfg, [], val, val.threshold)
    final = training.final_detector(result, data, config)
    assert final.gallery_ids == data.gallery_ids and len(final.gallery) == len(data.gallery_ids)
    np.testing.assert_array_equal(training.validation_gallery(5, 0, 0), np.arange(5))
    np.testing.assert_array_equal(training.validation_gallery(5, 10, 0), np.arange(5))


@pytest.mark.ray
def test_calibrating_kind_stores_its_reference_pool(ray_local, sample_bench, tmp_path):  # noqa: F811
    """A triplet detector compares with the real pool too: the index holds it, and predict's numbers stay equal."""
    from fingerprint.commands import predict
    from fingerprint.data.imagesets import load_fit_data
    from jobs import embed_ray

    settings = {"backbone": "resnet18", "weights": "none", "image_size": 32, "embed_dim": 16, "epochs": 1,
                "triplets_per_epoch": 16, "train_batch_size": 8, "k": 3, "device": "cpu", "augment": False}
    det = fit_detector("triplet", settings, load_fit_data(sample_bench, 0.25, 0))
    plain_dir = det.save(tmp_path / "plain")
    det_dir = det.save(tmp_path / "triplet")
    embed_ray.main(embed_ray.EmbedConfig(model=str(det_dir), data=str(sample_bench), workers=1, gpu="no"))
    stored = read_index(det_dir / "index")
    assert stored.reference is not None and stored.reference_ids == det.reference_ids
    np.testing.assert_allclose(stored.reference, det.arrays()["reference"], rtol=1e-5, atol=1e-5)
    outs = {}
    for name, model in (("plain", plain_dir), ("indexed", det_dir)):
        sub = predict.main(predict.PredictConfig(model=str(model), data=str(sample_bench), evidence=0,
                                                 out=str(tmp_path / f"out-{name}")))
        outs[name] = _jsonl(sub.parent / "scores.jsonl")
    assert list(outs["plain"]) == list(outs["indexed"])
    for i, row in outs["plain"].items():
        assert outs["indexed"][i]["score"] == pytest.approx(row["score"], abs=1e-5)


def test_embedding_actor_reads_its_files_and_names_a_bad_one(sample_bench, frozen_detector, tmp_path):
    """The actor reads and decodes each listed file itself: same pixels as the library's loader; a file that
    vanished or broke after listing stops the job naming it, or is left out with --skip-bad."""
    from fingerprint.data.images import DataError, load_image
    from jobs.embed_ray import Embedder

    good = sorted((sample_bench / "dev" / "generated").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:40])
    batch = {"path": np.array([str(good[0]), str(tmp_path / "gone.png"), str(broken), str(good[1])], dtype=object),
             "id": np.array(["a", "gone", "broken", "b"], dtype=object)}
    for bad in (1, 2):
        one = {k: v[[0, bad]] for k, v in batch.items()}
        with pytest.raises(DataError, match=rf"{Path(one['path'][1]).name}.*--skip-bad"):
            Embedder(str(frozen_detector)).images(one)
    ids, images = Embedder(str(frozen_detector), skip_bad=True).images(batch)
    assert ids == ["a", "b"]
    np.testing.assert_array_equal(np.asarray(images[1]), np.asarray(load_image(good[1])))
    out = Embedder(str(frozen_detector), skip_bad=True)(batch)
    assert list(out["id"]) == ["a", "b"] and out["embedding"].shape[0] == 2
