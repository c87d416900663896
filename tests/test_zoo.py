"""The generator zoo: families fit, sample, save and load deterministically; `fingerprint zoo` writes honest
benchmarks (whole groups, consistent labels, same seed = same files) and names the flag of any bad input."""

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fingerprint.config import ConfigError, field_docs
from fingerprint.data.phantoms import make_patients
from fingerprint.zoo import create_generator, families, load_generator
from fingerprint.zoo.build import BuildSettings, build_benchmark, build_suite, load_pool, load_suite

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "dcgan": {"steps": 6, "batch_size": 8, "width": 8, "latent_dim": 8},
    "vae": {"steps": 6, "batch_size": 8, "width": 8, "latent_dim": 4},
    "ae_gmm": {"steps": 6, "batch_size": 8, "width": 8, "latent_dim": 4, "components": 3},
    "diffusion": {"steps": 4, "batch_size": 8, "width": 8, "levels": 2, "timesteps": 50, "sample_steps": 4,
                  "eta": 0.5},
}


@pytest.fixture(scope="module")
def tiny_images() -> np.ndarray:
    images, _ = make_patients(np.random.default_rng(0), 5, 2, 16)
    return images.astype(np.float32) / 255.0


def test_registry_has_the_four_families_with_documented_bounded_settings():
    assert set(families()) >= {"dcgan", "vae", "diffusion", "ae_gmm"}
    for name, fam in families().items():
        docs = field_docs(fam.cls.Settings)
        assert all(f.name in docs for f in dataclasses.fields(fam.cls.Settings)), name
        assert fam.description


@pytest.mark.parametrize("name", ["dcgan", "vae", "ae_gmm", "diffusion"])
def test_family_fits_samples_and_reloads_deterministically(name, tiny_images, tmp_path):
    gen = create_generator(name, TINY[name])
    steps = []
    history = gen.fit(tiny_images, seed=3, on_step=steps.append)
    assert history and history[-1]["step"] == TINY[name]["steps"] and all("loss" in h for h in history)
    assert np.isfinite([h["loss"] for h in history]).all() and steps == history
    x = gen.sample(5, seed=1)
    assert x.shape == (5, 16, 16) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert np.array_equal(x, gen.sample(5, seed=1))
    assert not np.array_equal(x, gen.sample(5, seed=2))
    assert not np.array_equal(x, gen.sample(5, seed=1, temperature=0.5))
    again = create_generator(name, TINY[name])
    again.fit(tiny_images, seed=3)
    assert np.array_equal(x, again.sample(5, seed=1))
    gen.save(tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    assert type(loaded) is type(gen) and loaded.settings == gen.settings
    assert np.array_equal(x, loaded.sample(5, seed=1))
    assert gen.sample(0, seed=0).shape == (0, 16, 16)


def test_ae_gmm_with_one_component_per_image_and_low_temperature_copies_training_images(tiny_images):
    gen = create_generator("ae_gmm", {**TINY["ae_gmm"], "steps": 40, "components": 50, "covariance": "diag"})
    gen.fit(tiny_images, seed=0)
    assert gen.extra["components"] == len(tiny_images)  # capped at the training-set size
    cold, warm = gen.sample(40, seed=0, temperature=0.01), gen.sample(40, seed=0, temperature=3.0)
    means = gen.gmm["means"] * gen.gmm["scale"] + gen.gmm["shift"]
    import torch

    with torch.no_grad():
        decoded = gen.dec(torch.from_numpy(means.astype(np.float32)))[:, 0].numpy()

    def nearest(x: np.ndarray) -> float:
        return float(((x[:, None] - decoded[None]) ** 2).mean(axis=(2, 3)).min(axis=1).mean())

    assert nearest(cold) * 100 < nearest(warm)


def test_bad_family_and_settings_name_the_flag(tiny_images):
    with pytest.raises(ConfigError, match="--family"):
        create_generator("stylegan", {})
    with pytest.raises(ConfigError, match=r"--settings.*unknown.*stepz"):
        create_generator("dcgan", {"stepz": 3})
    with pytest.raises(ConfigError, match=r"--settings: vae.steps"):
        create_generator("vae", {"steps": 0})
    with pytest.raises(ConfigError, match=r"--settings: diffusion.width: must be a multiple of 4"):
        create_generator("diffusion", {"width": 10})
    with pytest.raises(ValueError, match="power of two"):
        create_generator("vae", TINY["vae"]).fit(np.zeros((4, 24, 24), np.float32))


# ----------------------------------------------------------------------------------------------------- build


FAST = BuildSettings(members=12, image_size=16, dev_generated=10, test_generated=12, seed=5)


def _build(pool, out: Path, **kw) -> dict:
    build = dataclasses.replace(FAST, **kw)
    return build_benchmark(out, pool, "ae_gmm", TINY["ae_gmm"], build)


@pytest.fixture(scope="module")
def built(sample_bench, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "b1"
    _build([sample_bench], out)
    return out


def _png_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_build_writes_the_shared_layout_with_consistent_labels_and_whole_groups(built, sample_bench):
    from fingerprint.data.images import open_benchmark

    dev, test = open_benchmark(built)
    counts = {**dev.counts(), **{f"test_{k}": v for k, v in test.counts().items()}}
    assert counts["generated"] == 10 and counts["test_generated"] == 12
    assert counts["used"] > 0 and counts["not_used"] > 0 and counts["test_real_unknown"] > 0
    for name in ("test_labels.csv", "groups.csv", "split.json", "zoo.json", "README.md", "generator/meta.json"):
        assert (built / name).is_file(), name
    split = json.loads((built / "split.json").read_text())
    files = split["files"]
    members = set(split["members"])
    # Members are exactly the used images; no member is ever a not-used image.
    assert {f["source"] for f in files.values() if f["label"] == 1} == members
    assert not members & {f["source"] for f in files.values() if f["label"] == 0}
    assert all(f["label"] == 0 for k, f in files.items() if k.startswith("dev/not_used/"))
    # Whole groups: a group is on one side only, and in dev or test only.
    sides: dict[int, set] = {}
    for rel, f in files.items():
        sides.setdefault(f["group"], set()).add((f["label"], rel.split("/")[0]))
    assert all(len(s) == 1 for s in sides.values())
    with open(built / "test_labels.csv") as fh:
        labels = {r["id"]: int(r["label"]) for r in csv.DictReader(fh)}
    assert labels == {Path(k).stem: f["label"] for k, f in files.items() if k.startswith("test/")}
    assert set(labels) == {it.id for it in test.role("real_unknown")}
    with open(built / "groups.csv") as fh:
        groups = {r["id"]: int(r["group"]) for r in csv.DictReader(fh)}
    assert groups == {Path(k).stem: f["group"] for k, f in files.items()}
    record = json.loads((built / "zoo.json").read_text())
    assert record["family"] == "ae_gmm" and record["seed"] == 5 and record["history"]
    assert record["counts"]["members"] == len(members) and 0 <= record["checks"]["nn_l2_auc_dev"] <= 1
    # Every image is at the build size; the saved generator samples at it too.
    assert load_generator(built / "generator").sample(2, seed=0).shape == (2, 16, 16)
    assert "ae_gmm" in (built / "README.md").read_text()


def test_same_seed_rebuilds_the_same_files_and_another_seed_does_not(built, sample_bench, tmp_path):
    _build([sample_bench], tmp_path / "b2")
    assert _png_hashes(built) == _png_hashes(tmp_path / "b2")
    for name in ("test_labels.csv", "groups.csv", "split.json", "generator/weights.safetensors"):
        assert (built / name).read_bytes() == (tmp_path / "b2" / name).read_bytes(), name
    _build([sample_bench], tmp_path / "b3", seed=6)
    assert _png_hashes(built) != _png_hashes(tmp_path / "b3")


def test_null_control_trains_on_other_groups_and_declares_nothing_memorised(sample_bench, tmp_path):
    """--null-control: the images labelled used are drawn exactly as before, but the generator trains on as many
    other groups, released nowhere; zoo.json says memorisation 'none' and the suite reads it."""
    from fingerprint.evaluation.suite import zoo_info
    from fingerprint.zoo.build import NULL_LEVEL

    # A manifest with 12 groups of 3: the phantoms' inferred grouping (5 groups) is too coarse for three sets.
    real = sorted(p for d in ("dev/used", "dev/not_used", "test/real_unknown") for p in (sample_bench / d).glob("*"))
    manifest = tmp_path / "pool.csv"
    manifest.write_text("path,role,group\n" + "".join(f"{p},real_unknown,{i // 3}\n" for i, p in enumerate(real)))
    ordinary, out = tmp_path / "ordinary", tmp_path / "null"
    _build([manifest], ordinary, members=6)
    record = _build([manifest], out, members=6, null_control=True)
    split = json.loads((out / "split.json").read_text())
    files = split["files"].values()
    labelled = {f["source"] for f in files}
    used = {f["source"] for f in files if f["label"] == 1}
    trained = set(split["members"])
    assert split["null_control"] and trained and used and not trained & labelled
    assert "null_control" not in json.loads((ordinary / "split.json").read_text())  # ordinary builds unchanged
    # Same seed: the same images labelled used as the ordinary build, which trained on exactly them.
    assert used == set(json.loads((ordinary / "split.json").read_text())["members"])
    pool = load_pool([manifest], 16)
    group = dict(zip(pool.sources, pool.groups.tolist(), strict=True))
    assert not {group[s] for s in trained} & {group[s] for s in labelled}  # whole groups, none shared
    assert record["memorisation"] == NULL_LEVEL and record["build"]["null_control"]
    assert record["counts"]["members"] == len(trained) and record["counts"]["labelled_used"] == len(used)
    assert zoo_info(out)[:2] == ("ae_gmm", NULL_LEVEL)
    assert zoo_info(ordinary)[1] != NULL_LEVEL and "memorisation" not in json.loads(
        (ordinary / "zoo.json").read_text())
    assert "A null control" in (out / "README.md").read_text()
    # Too small a pool for three disjoint sets names the flag.
    with pytest.raises(ConfigError, match="--members.*null control"):
        _build([manifest], tmp_path / "too-big", null_control=True, members=16)


def test_split_of_a_null_control_labels_the_same_images_and_trains_on_other_groups():
    from fingerprint.zoo.build import split_groups

    groups = np.repeat(np.arange(60), 3)
    plain = split_groups(groups, BuildSettings(members=30), seed=4)
    null = split_groups(groups, BuildSettings(members=30, null_control=True), seed=4)
    assert np.array_equal(plain["trained"], np.sort(np.r_[plain["dev_used"], plain["test_used"]]))
    for part in ("dev_used", "test_used"):
        assert np.array_equal(plain[part], null[part])
    released = np.concatenate([null[k] for k in ("dev_used", "test_used", "dev_not_used", "test_not_used")])
    assert len(null["trained"]) >= 30 and not set(groups[null["trained"]]) & set(groups[released])
    every = np.sort(np.concatenate([released, null["trained"], null["left_out"]]))
    assert np.array_equal(every, np.arange(len(groups)))  # each image in exactly one part


def test_pool_reads_plain_folders_and_manifests_and_drops_duplicates(sample_bench, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    roles = ("dev/used", "dev/not_used", "test/real_unknown")
    real = sorted(p for d in roles for p in (sample_bench / d).glob("*.png"))
    for p in real:
        shutil.copy(p, plain / f"{p.parent.name}_{p.name}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,role,group\n" + "".join(f"{p},real_unknown,{i // 3}\n" for i, p in enumerate(real[:6])))
    bench = load_pool([str(sample_bench)], 16)
    assert len(bench.sources) == len(real)
    both = load_pool([str(plain), str(sample_bench)], 16)
    assert len(both.sources) == len(real) and len(both.duplicates) == len(real)
    m = load_pool([str(manifest)], 16)
    assert m.groups.tolist() == [0, 0, 0, 1, 1, 1]  # the manifest's groups, not inferred ones


def test_bad_inputs_raise_config_errors_naming_the_flag(sample_bench, tmp_path):
    from fingerprint.commands.zoo import ZooConfig, main

    ok = dict(pool=str(sample_bench), out=str(tmp_path / "o"), family="ae_gmm", settings=json.dumps(TINY["ae_gmm"]),
              members=12, image_size=16, dev_generated=4, test_generated=4, progress=False)
    cases = {
        "--pool": dict(pool=str(tmp_path / "missing")),
        "--family": dict(family="stylegan"),
        "--settings": dict(settings='{"steps": -1}'),
        "--image-size": dict(image_size=24),
        "--members": dict(members=10_000),
        "--dev-fraction": dict(dev_fraction=1.5),
    }
    for name, change in cases.items():
        with pytest.raises(ConfigError, match=name):
            main(ZooConfig(**{**ok, **change}))
    with pytest.raises(ConfigError, match="--settings.*JSON"):
        main(ZooConfig(**{**ok, "settings": "{steps"}))
    (tmp_path / "o").mkdir()
    with pytest.raises(ConfigError, match="--out"):
        main(ZooConfig(**ok))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="--pool.*no real images"):
        main(ZooConfig(**{**ok, "pool": str(empty), "overwrite": True}))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from fingerprint.commands.cli import main

    assert main(["zoo", "--pool", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--pool" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- suites


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_suite_builds_each_entry_and_resumes(sample_bench, tmp_path):
    spec = _spec(tmp_path, f"""
pool: [{sample_bench}]
defaults: {{image_size: 16, dev_generated: 6, test_generated: 6, members: 12}}
entries:
  - {{name: a, family: ae_gmm, settings: {json.dumps(TINY["ae_gmm"])}, seed: 1}}
  - {{name: b, family: vae, settings: {json.dumps(TINY["vae"])}, temperature: 0.5, members: 10}}
""")
    records = build_suite(spec, tmp_path / "out")
    assert [r["name"] for r in records] == ["a", "b"]
    assert records[1]["build"]["temperature"] == 0.5 and records[1]["build"]["members"] == 10
    assert records[0]["seed"] == 1 and records[0]["build"]["image_size"] == 16
    summary = json.loads((tmp_path / "out/suite.json").read_text())
    assert [e["name"] for e in summary["entries"]] == ["a", "b"]
    stamp = (tmp_path / "out/a/zoo.json").stat().st_mtime_ns
    build_suite(spec, tmp_path / "out", only=["a"])  # already built: kept
    assert (tmp_path / "out/a/zoo.json").stat().st_mtime_ns == stamp
    # The spec changed after the build: the entry is rebuilt with the new settings, not kept.
    spec.write_text(spec.read_text().replace('"components": 3', '"components": 2'))
    (rebuilt,) = build_suite(spec, tmp_path / "out", only=["a"])
    assert rebuilt["settings"]["components"] == 2
    assert (tmp_path / "out/a/zoo.json").stat().st_mtime_ns != stamp
    with pytest.raises(ConfigError, match="--only"):
        build_suite(spec, tmp_path / "out", only=["zzz"])
    # A fresh draw (--reseed): every entry's seed moves by the same amount, so other splits of the pool.
    (fresh,) = build_suite(spec, tmp_path / "draw2", only=["a"], reseed=10)
    assert fresh["seed"] == 11 and json.loads((tmp_path / "draw2/suite.json").read_text())["reseed"] == 10
    members = json.loads((tmp_path / "out/a/split.json").read_text())["members"]
    assert sorted(members) != sorted(json.loads((tmp_path / "draw2/a/split.json").read_text())["members"])


@pytest.mark.parametrize("entry, expected", [
    ("{name: x, family: gan}", r"entry 0 \(x\), field family: unknown family"),
    ("{name: x, family: vae, settings: {steps: 0}}", r"entry 0 \(x\), field settings: vae.steps"),
    ("{name: x, family: vae, members: 1}", r"entry 0 \(x\), field members: must be >= 2"),
    ("{name: x, family: vae, colour: red}", r"entry 0 \(x\), field colour: Extra inputs"),
    ("{name: x, family: vae, members: lots}", r"entry 0 \(x\), field members: .*integer"),
    ("{family: vae}", r"entry 0, field name: Field required"),
])
def test_bad_suite_entries_name_the_entry_and_field(tmp_path, entry, expected):
    spec = _spec(tmp_path, f"pool: [somewhere]\nentries:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=expected) as e:
        load_suite(spec)
    assert "--spec" in str(e.value)


def test_shipped_suite_is_valid_and_spans_the_families():
    suite = load_suite(ROOT / "benchmarks/zoo/suite.yaml")
    assert len(suite.entries) >= 8
    assert {e.family for e in suite.entries} == {"dcgan", "vae", "diffusion", "ae_gmm"}
    assert any(e.null_control for e in suite.entries)  # something where nothing is to be found
    # Each entry draws its own split of the pool: benchmarks sharing one are not independent held-out tests.
    seeds = [e.seed if e.seed is not None else suite.defaults.seed for e in suite.entries]
    assert len(set(seeds)) == len(seeds), seeds


def test_shadow_detectors_train_shadows_with_the_zoo_benchmarks_recipe(built, sample_bench, tmp_path):
    """On a zoo benchmark the harness and `fingerprint fit` give shadow detectors the target's family, settings,
    temperature and size from zoo.json (never its split); elsewhere the preset's stand-in; --settings win."""
    from fingerprint.commands.fit import FitConfig
    from fingerprint.detectors import PRESETS
    from fingerprint.evaluation import benchmark as bm
    from fingerprint.zoo.build import generator_recipe

    recipe = generator_recipe(built)
    record = json.loads((built / "zoo.json").read_text())
    assert recipe == {"family": "ae_gmm", "generator_settings": json.dumps(record["settings"], sort_keys=True),
                      "temperature": record["build"]["temperature"], "generator_size": 16}
    assert generator_recipe(sample_bench) is None
    kind, settings = bm.preset("shadow_gradient", bm.BenchmarkConfig(data=str(built), image_size=32))
    assert kind == "shadow" and settings["image_size"] == 32 and recipe.items() <= settings.items()
    assert bm.preset("shadow_gradient", bm.BenchmarkConfig(data=str(sample_bench)))[1]["family"] == \
        PRESETS["shadow_gradient"][1]["family"]
    # A benchmark without zoo.json takes a recipe file (--recipe), shaped like one; a bad one names the flag.
    given = bm.BenchmarkConfig(data=str(sample_bench), recipe=str(built / "zoo.json"), image_size=32)
    assert recipe.items() <= bm.preset("shadow_gradient", given)[1].items()
    (tmp_path / "bad.json").write_text('{"family": "dcgan"}')
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        problems = bm.BenchmarkConfig(data=str(sample_bench), recipe=str(bad), detectors="f",
                                     submit="none").problems()
        assert len(problems) == 1 and problems[0].startswith("--recipe:") and str(bad) in problems[0]
    for shipped in (ROOT / "benchmarks" / "recipes").glob("*.json"):  # the shared ctbench sets' recipes
        assert generator_recipe(shipped)["family"] == "dcgan", shipped
    _, fit_settings = FitConfig(data=str(built), preset="shadow_gradient", settings='{"shadows": 2}').resolved()
    assert fit_settings["shadows"] == 2 and fit_settings["family"] == "ae_gmm"
    assert FitConfig(data=str(built), kind="shadow", settings='{"family": "vae"}').resolved()[1]["family"] == "vae"
    # An ensemble's shadow member gets the recipe too, wherever the ensemble is fitted.
    kind, ens = FitConfig(data=str(built), preset="shadow_ensemble").resolved()
    member = json.loads(ens["member_settings"])
    assert kind == "rank_ensemble" and set(member) == {"shadow_gradient"} and member["shadow_gradient"] == recipe
    from fingerprint.detectors import create_detector

    shadow_member = create_detector(kind, ens)._members()[1]
    assert shadow_member.settings.family == "ae_gmm" and shadow_member.settings.generator_size == 16

    # End to end: the harness fits it (four tiny ae_gmm shadows) beside the calibrated detector it extends, on the
    # sample benchmark (enough patients on each side for 2 folds) given the zoo build's recipe.
    bench, out = tmp_path / "sample", tmp_path / "bench"
    shutil.copytree(sample_bench, bench)
    shutil.copy(built / "zoo.json", bench / "zoo.json")
    res = bm.main(bm.BenchmarkConfig(data=str(bench), out=str(out), detectors="gradient_cal,f", image_size=32,
                                     folds=2, repeats=1, n_boot=50, submit="shadow_gradient"))
    rows = {r["name"]: r for r in res["detectors"]}
    assert {"shadow_gradient", "shadow_ensemble"} <= set(rows) and rows["shadow_gradient"]["family"] == "f"
    saved = json.loads((out / "detector" / "meta.json").read_text())
    assert saved["kind"] == "shadow" and saved["settings"]["family"] == "ae_gmm"
