"""`fingerprint train` run folders: a checkpoint every epoch, Ctrl-C and --resume, refusal, --overwrite, leftovers.

Real CPU training on the tiny sample benchmark; the interrupt test sends a real SIGINT to the CLI in a subprocess.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fingerprint.commands import cli
from fingerprint.commands import train as train_cmd
from fingerprint.detectors.triplet.checkpoint import load_checkpoint
from fingerprint.io import atomic_dir, remove_stale_temps

EPOCHS = 3
ROOT = Path(__file__).resolve().parents[1]


def flags(sample_bench, tiny_train_kwargs, out, **extra) -> list[str]:
    kwargs = {**tiny_train_kwargs, "epochs": EPOCHS, **extra}
    return ["train", "--data", str(sample_bench), "--out", str(out),
            *(a for k, v in kwargs.items() for a in (f"--{k.replace('_', '-')}", str(v)))]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint" / "model.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(sample_bench, tiny_train_kwargs, tmp_path_factory) -> Path:
    """An uninterrupted run, the yardstick for resumed ones."""
    out = tmp_path_factory.mktemp("reference")
    train_cmd.main(train_cmd.TrainRunConfig(data=str(sample_bench), out=str(out), **{**tiny_train_kwargs,
                                                                                   "epochs": EPOCHS}))
    return out


def test_sigint_then_resume_matches_an_uninterrupted_run(sample_bench, tiny_train_kwargs, reference, tmp_path):
    out = tmp_path / "run"
    # A child of a shell without job control may inherit SIGINT ignored; give it the default, as a terminal would.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fingerprint.commands.cli", *flags(sample_bench, tiny_train_kwargs, out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "meta.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (out / "checkpoint" / "meta.json").is_file(), "no checkpoint appeared"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and said[0].startswith("fingerprint train: interrupted; the last finished epoch (")
    assert f"is saved in {out / 'checkpoint'}, resume with --resume" in said[0]
    # The last finished epoch is intact, and nothing of the final outputs was written.
    saved = json.loads((out / "checkpoint" / "meta.json").read_text())["epoch"]
    assert 0 <= saved < EPOCHS - 1 or "(3 of 3)" in said[0]
    load_checkpoint(out / "checkpoint")
    assert not (out / "detector").exists() and not (out / "history.json").exists()

    # Leftovers of a killed atomic write are removed on start; only `.<name>.*` of the run's own outputs.
    (out / ".checkpoint.xyz").mkdir()
    (out / ".checkpoint.xyz" / "model.pt").write_bytes(b"half")
    (out / ".config.json.abc.tmp").write_text("{")
    (out / ".notes").write_text("mine")
    (out / ".checkpointer").mkdir()

    assert cli.main([*flags(sample_bench, tiny_train_kwargs, out), "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["epoch"] == EPOCHS - 1
    assert not (out / ".checkpoint.xyz").exists() and not (out / ".config.json.abc.tmp").exists()
    assert (out / ".notes").read_text() == "mine" and (out / ".checkpointer").is_dir()
    assert not [p for p in out.iterdir() if p.name.startswith((".checkpoint.", ".detector."))]

    # Same seeds, same triplets per (epoch, index): the resumed model is the uninterrupted one.
    ref, got = weights(reference), weights(out)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.allclose(ref[name].float(), got[name].float(), atol=1e-4), name
    ref_meta = json.loads((reference / "detector" / "meta.json").read_text())
    got_meta = json.loads((out / "detector" / "meta.json").read_text())
    assert got_meta["threshold"] == pytest.approx(ref_meta["threshold"], abs=1e-4)

    # Checkpoint and detector folders get the umask's permissions, not mkdtemp's 0700.
    umask = os.umask(0)
    os.umask(umask)
    for folder in (out / "checkpoint", out / "detector", reference / "checkpoint"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_overwrite_interrupted_leaves_only_the_new_run_and_reruns_are_refused(
        sample_bench, tiny_train_kwargs, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)

    # A folder holding a run is refused before any work, naming both ways on.
    assert cli.main(flags(sample_bench, tiny_train_kwargs, out, seed=1)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(out) in err and "Traceback" not in err
    assert snapshot(out) == before

    # --overwrite removes the old run first: interrupted after its first epoch, the folder holds only the new run.
    def stop(end):
        raise KeyboardInterrupt

    config = train_cmd.TrainRunConfig(data=str(sample_bench), out=str(out), overwrite=True,
                                   **{**tiny_train_kwargs, "epochs": EPOCHS, "seed": 1})
    with pytest.raises(KeyboardInterrupt) as e:
        train_cmd.main(config, on_epoch=stop)
    assert str(e.value) == (f"the last finished epoch (1 of {EPOCHS}) is saved in {out / 'checkpoint'}, "
                            "resume with --resume")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.json", "split.json"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["seed"] == 1 and "resume" not in saved and "overwrite" not in saved
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["epoch"] == 0 and meta["config"]["seed"] == 1

    # Resuming with other training settings is an error naming them; where and how fast may change.
    assert cli.main([*flags(sample_bench, tiny_train_kwargs, out, seed=0, lr=0.001), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--seed 1 (now 0)" in err and "--lr" in err and "--overwrite" in err and "--out" in err
    assert "--device" not in err
    assert cli.main([*flags(sample_bench, tiny_train_kwargs, out, seed=1), "--resume", "--overwrite"]) == 2
    assert "give one" in capsys.readouterr().err
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["epoch"] == 0

    # Resuming with the same settings finishes the run: every epoch once.
    resumed = dataclasses.replace(config, overwrite=False, resume=True, loader_workers=0)
    train_cmd.main(resumed)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(EPOCHS))


def test_resume_needs_a_run(sample_bench, tiny_train_kwargs, tmp_path, capsys):
    assert cli.main([*flags(sample_bench, tiny_train_kwargs, tmp_path / "empty"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no run to resume" in err and "Traceback" not in err
    assert not (tmp_path / "empty").exists()


def test_an_unmeetable_decision_rule_is_refused_before_training(sample_bench, tiny_train_kwargs, tmp_path, capsys):
    args = [*flags(sample_bench, tiny_train_kwargs, tmp_path / "run"), "--threshold-method", "fpr_bound"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--threshold-method fpr_bound" in err and "at least 59 groups" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "history.json").exists()


def test_interrupt_of_other_commands_is_one_line(capsys):
    @dataclasses.dataclass
    class Nothing:
        pass

    def interrupted(config):
        raise KeyboardInterrupt

    code = cli.run(cli.Command(Nothing, interrupted, "test"), cli.argparse.Namespace(), "fingerprint predict")
    assert code == 130 and capsys.readouterr().err == "fingerprint predict: interrupted\n"


def test_atomic_dir_gives_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("x")
        with atomic_dir(tmp_path / "folder") as tmp:  # replacing an existing one too
            (tmp / "g").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_remove_stale_temps_only_matching_and_restores_an_old_copy(tmp_path):
    # Killed between atomic_dir's two renames: checkpoint/ is gone, .checkpoint.old is the whole previous one.
    (tmp_path / ".checkpoint.old").mkdir()
    (tmp_path / ".checkpoint.old" / "meta.json").write_text("{}")
    (tmp_path / ".checkpoint.k2j4x_9a").mkdir()
    (tmp_path / ".detector.abc").mkdir()
    (tmp_path / ".config.json.3bq0.tmp").write_text("{")
    for keep in (".checkpoints", "checkpoint.x", ".other.abc", "sub/.checkpoint.abc"):
        (tmp_path / keep).mkdir(parents=True)
    removed = remove_stale_temps(tmp_path, ["checkpoint", "detector", "config.json"])
    assert sorted(p.name for p in removed) == [".checkpoint.k2j4x_9a", ".config.json.3bq0.tmp", ".detector.abc"]
    assert (tmp_path / "checkpoint" / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoints", ".other.abc", "checkpoint",
                                                          "checkpoint.x", "sub"]
    assert (tmp_path / "sub" / ".checkpoint.abc").is_dir()
