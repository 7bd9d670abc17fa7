"""A run directory is never lost or mixed: --overwrite only of runs, one writer, strict resume, kills anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chaintune.cli.main import main
from chaintune.errors import ChaintuneError

TINY = ["--steps", "4", "--batch-size", "2", "--sample-steps", "3", "--eval-samples", "2", "--eval-every", "100",
        "--no-tensorboard", "--no-progress", "--lr", "1e-3", "--no-report"]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def one_error(code: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error:") and needle in lines[-1], err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------ --overwrite


def test_overwrite_never_deletes_what_is_not_a_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "align", *TINY, "--out", "mine", "--overwrite"), "deletes only chaintune runs")
    one_error(*run_cli(capsys, "align", *TINY, "--out", ".", "--overwrite"), "working directory")
    one_error(*run_cli(capsys, "align", *TINY, "--out", "..", "--overwrite"), "working directory")
    assert snapshot(tmp_path) == before

    assert run_cli(capsys, "align", *TINY, "--out", "run")[0] == 0
    (tmp_path / "run" / "notes.txt").write_text("mine too")  # a user file inside a run: not ours to delete
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "align", *TINY, "--out", "run", "--overwrite"), "notes.txt")
    assert snapshot(tmp_path) == before
    (tmp_path / "run" / "notes.txt").unlink()
    assert run_cli(capsys, "align", *TINY, "--out", "run", "--overwrite")[0] == 0


def test_overwrite_deletes_only_after_inputs_are_valid(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--out", "run")[0] == 0
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "align", *TINY, "--out", "run", "--overwrite", "--model", "/nonexistent"),
              "/nonexistent")
    one_error(*run_cli(capsys, "align", *TINY, "--out", "run", "--overwrite", "--reward", "digt:3"), "digit")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------ one writer


def test_run_lock_admits_one_writer(tmp_path):
    from chaintune.run.rundir import RunLock

    tmp_path.joinpath("r").mkdir()
    first = RunLock(tmp_path / "r").acquire()
    with pytest.raises(ChaintuneError, match="being written by another chaintune process"):
        RunLock(tmp_path / "r").acquire()
    first.release()
    RunLock(tmp_path / "r").acquire().release()  # released: the next writer may go


def _popen(*args: str, cwd: Path, script: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", CHAINTUNE_THREADS="1")
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "chaintune.cli.main", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_concurrent_writers_cannot_both_proceed(tmp_path):
    long = ["--steps", "400", *TINY[2:]]
    first = _popen("align", *long, "--out", "run", cwd=tmp_path)
    try:
        _wait_for(tmp_path / "run" / "chaintune_run.json", first)
        for extra in (["--resume"], ["--overwrite"]):
            second = _popen("align", *long, "--out", "run", *extra, cwd=tmp_path)
            out, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert "being written by another chaintune process" in err and "Traceback" not in err
        assert first.poll() is None  # the first writer is untouched
    finally:
        first.kill()
        first.communicate()


# ------------------------------------------------------------------------------------------ kills and resume

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import chaintune.run.checkpoint as ck
    WHEN = sys.argv[1]
    if WHEN == "pruning":  # SIGKILL after the old checkpoint was renamed, before it is deleted
        import shutil
        rmtree = shutil.rmtree
        def kill_in_prune(path, *a, **k):
            if str(path).endswith(".deleting"):
                os.kill(os.getpid(), signal.SIGKILL)
            return rmtree(path, *a, **k)
        ck.shutil.rmtree = kill_in_prune
    else:  # SIGKILL when the first checkpoint is about to be written
        def kill_in_save(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        ck.save = kill_in_save
    from chaintune.cli.main import main
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("when", ["pruning", "before-first-checkpoint"])
def test_killed_runs_resume_to_the_uninterrupted_weights(tmp_path, when):
    args = ["align", *TINY, "--save-every", "1", "--keep-checkpoints", "1"]
    full = _popen(*args, "--out", "full", cwd=tmp_path)
    assert full.communicate(timeout=300)[0] is not None and full.returncode == 0

    cut = _popen(cwd=tmp_path, script=_KILL_SCRIPT.replace("sys.argv[1]", repr(when)).replace(
        "sys.argv[2:]", repr([*args, "--out", "cut"])))
    cut.communicate(timeout=300)
    assert cut.returncode == -9  # killed where we wanted
    info = json.loads((tmp_path / "cut" / "chaintune_run.json").read_text())
    assert info["status"] in ("starting", "running")
    ckpts = tmp_path / "cut" / "checkpoints"
    if when == "pruning":
        assert any(p.name.endswith(".deleting") for p in ckpts.iterdir())  # the half-pruned leftover
    else:
        assert not ckpts.exists() or not list(ckpts.glob("step_*"))

    resumed = _popen("align", "--out", "cut", "--resume", cwd=tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    same_weights(tmp_path / "full", tmp_path / "cut")
    assert not [p for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith(".")]
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_resume_uses_the_newest_intact_checkpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--save-every", "1", "--keep-checkpoints", "3", "--out", "full")[0] == 0
    assert run_cli(capsys, "align", *TINY, "--save-every", "1", "--keep-checkpoints", "3", "--out", "cut",
                   "--steps", "3")[0] == 0
    newest = tmp_path / "cut" / "checkpoints" / "step_000003" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])  # truncated by a full disk, say
    code, err = run_cli(capsys, "align", "--out", "cut", "--resume", "--steps", "4")
    assert code == 0 and "step_000003 is corrupt" in err and "trying the previous checkpoint" in err
    same_weights(tmp_path / "full", tmp_path / "cut")


def test_resume_refuses_a_changed_experiment(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--save-every", "2", "--out", "r")[0] == 0
    before = snapshot(tmp_path)
    for flags, needle in ((["--lr", "0.5"], "lr: 0.001 -> 0.5"), (["--estimator", "reinforce"], "estimator"),
                          (["--model", "builtin:glyphs"], "model"), (["--peft", "lora"], "peft")):
        one_error(*run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "6", *flags), needle)
    assert snapshot(tmp_path) == before
    cfg = tmp_path / "r" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("lr: 0.001", "lr: 0.5"))  # an edited config.yaml is caught too
    one_error(*run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "6"), "lr: 0.001 -> 0.5")
    cfg.write_text(cfg.read_text().replace("lr: 0.5", "lr: 0.001"))
    assert run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "6", "--eval-every", "3")[0] == 0


def test_restore_is_strict_about_names_and_shapes(tmp_path):
    from chaintune.run import checkpoint as ckpt

    def parts(module):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        return module, opt, None, torch.Generator()

    a = torch.nn.Linear(3, 2)
    ckpt.save(tmp_path, 1, *parts(a), {}, keep=1)
    with pytest.raises(ChaintuneError, match=r"has shape \[\d+(, 3)?\] there and \[4(, 3)?\] in the model"):
        ckpt.restore(tmp_path, *parts(torch.nn.Linear(3, 4)), {})
    with pytest.raises(ChaintuneError, match="unknown parameter 'bias'"):
        ckpt.restore(tmp_path, *parts(torch.nn.Linear(3, 2, bias=False)), {})
    assert ckpt.restore(tmp_path / "none", *parts(torch.nn.Linear(3, 2)), {}) is None  # no checkpoint: start over


def test_saved_code_runs_on_resume_only_with_trust(capsys, tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text("def r(images, **kw):\n    return images.flatten(1).mean(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--estimator", "reinforce", "--reward", "myreward:r", "--save-every",
                   "2", "--out", "r")[0] == 0
    one_error(*run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "6"), "--trust-code")
    assert run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "6", "--trust-code")[0] == 0


# ------------------------------------------------------------------------------------------ what a run holds


def test_resume_never_restarts_a_finished_run(capsys, tmp_path, monkeypatch):
    """A finished run without a checkpoint (--save-every 0) keeps its model: --resume refuses instead of starting
    over; with a checkpoint it continues only to more --steps."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--save-every", "0", "--out", "r")[0] == 0
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "align", "--out", "r", "--resume"), "no checkpoint to continue from")
    one_error(*run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "8"), "--model r --out NEW")
    assert snapshot(tmp_path) == before

    assert run_cli(capsys, "align", *TINY, "--save-every", "2", "--out", "c")[0] == 0
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "align", "--out", "c", "--resume"), "already finished at step 4")
    assert snapshot(tmp_path) == before
    assert run_cli(capsys, "align", "--out", "c", "--resume", "--steps", "6")[0] == 0
    assert json.loads((tmp_path / "c" / "chaintune_run.json").read_text())["final"]["step"] == 6


def test_overwrite_removes_only_chaintunes_own_entries(capsys, tmp_path, monkeypatch):
    """Hidden notes, a git repository, a file dropped into samples/: each stops --overwrite, named, untouched."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--eval-every", "2", "--out", "run")[0] == 0
    run = tmp_path / "run"
    for place, needle in ((run / ".my_notes", ".my_notes"), (run / ".git" / "HEAD", ".git/"),
                          (run / "samples" / "my_annotations.txt", "samples/my_annotations.txt"),
                          (run / "checkpoints" / "README", "checkpoints/README")):
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_text("the user's")
        before = snapshot(tmp_path)
        one_error(*run_cli(capsys, "align", *TINY, "--out", "run", "--overwrite"), needle)
        assert snapshot(tmp_path) == before
        place.unlink()
        if place.parent.name == ".git":
            place.parent.rmdir()
    from chaintune.run.rundir import foreign_entries

    assert foreign_entries(run) == []  # everything a finished run holds is chaintune's
    assert run_cli(capsys, "align", *TINY, "--out", "run", "--overwrite")[0] == 0


def test_resume_and_overwrite_together_are_refused_before_anything(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--save-every", "2", "--out", "r")[0] == 0
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "align", "--out", "r", "--resume", "--overwrite", "--steps", "6"), "give one of them")
    assert snapshot(tmp_path) == before


def test_a_run_is_never_overwritten_with_itself_as_the_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--out", "r")[0] == 0
    before = snapshot(tmp_path)
    for model in ("r", "r/model", str(tmp_path / "r")):
        one_error(*run_cli(capsys, "align", *TINY, "--model", model, "--out", "r", "--overwrite"), "reads from")
    assert snapshot(tmp_path) == before
    assert run_cli(capsys, "align", *TINY, "--model", "r", "--out", "r2")[0] == 0  # a new run from it is fine


def test_wrong_kinds_of_entries_stop_resume(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--save-every", "2", "--out", "r", "--steps", "2")[0] == 0
    (tmp_path / "r" / "report.html").unlink(missing_ok=True)
    (tmp_path / "r" / "report.html").mkdir()
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "4"), "report.html is a folder")
    assert snapshot(tmp_path) == before
    (tmp_path / "r" / "report.html").rmdir()
    import shutil

    shutil.rmtree(tmp_path / "r" / "checkpoints")
    (tmp_path / "r" / "checkpoints").write_text("not a folder")
    one_error(*run_cli(capsys, "align", "--out", "r", "--resume", "--steps", "4"), "checkpoints is a file")


def test_a_run_killed_before_its_marker_resumes(capsys, tmp_path, monkeypatch):
    """Killed after config.yaml but before the marker (what earlier versions wrote first): --resume starts it over
    and --overwrite replaces it; today the marker comes first, so a run folder is always recognisable."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--out", "full")[0] == 0
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    (stuck / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text().replace("out: full",
                                                                                               "out: stuck"))
    (stuck / ".chaintune_run.json.x1y2.tmp").write_text('{"comm')  # the marker's temp file, cut by the kill
    assert run_cli(capsys, "align", "--out", "stuck", "--resume")[0] == 0
    same_weights(tmp_path / "full", stuck)
    assert not list(stuck.glob(".*"))

    from chaintune.run.trainer import Trainer

    order = []
    monkeypatch.setattr(Trainer, "_status", lambda self, status, **kw: order.append("marker"))
    import chaintune.run.checkpoint as ck

    monkeypatch.setattr(ck, "save_config", lambda *a, **k: order.append("config"))
    def stop(self):  # once the run folder is made
        raise ChaintuneError("stopped here")

    monkeypatch.setattr(Trainer, "_train", stop)
    one_error(*run_cli(capsys, "align", *TINY, "--out", "fresh"), "stopped here")
    assert order[:2] == ["marker", "config"]


def test_leftovers_of_killed_overwrites_are_removed(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "align", *TINY, "--out", "r")[0] == 0
    from chaintune.run.rundir import TRASH_PREFIX

    (tmp_path / "r" / f"{TRASH_PREFIX}ab12cd34").mkdir()  # killed while deleting an overwritten run
    (tmp_path / "r" / f"{TRASH_PREFIX}ab12cd34" / "model.bin").write_bytes(b"\0" * 1000)
    (tmp_path / ".r.old-k3j4h5g6").mkdir()  # where versions before 0.1.1 put it: beside the run
    (tmp_path / ".r.old-keepthis-please").mkdir()  # not of that shape: not ours to delete
    assert run_cli(capsys, "align", *TINY, "--out", "r", "--overwrite")[0] == 0
    assert not (tmp_path / "r" / f"{TRASH_PREFIX}ab12cd34").exists() and not (tmp_path / ".r.old-k3j4h5g6").exists()
    assert (tmp_path / ".r.old-keepthis-please").is_dir()


def test_demo_replaces_only_what_a_demo_wrote(capsys, tmp_path, monkeypatch):
    """`chaintune demo --out DIR` refuses before training when DIR holds a before.png of the user's; bad demo options
    are refused at once (they used to start the whole demo)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "before.png").write_bytes(b"\x89PNG the user's")
    before = snapshot(tmp_path)
    one_error(*run_cli(capsys, "demo", "--out", "d", "--steps", "1"), "not written by a chaintune demo")
    one_error(*run_cli(capsys, "demo", "--baseline", "nope"), "nope")
    one_error(*run_cli(capsys, "demo", "--steps", "0"), "--steps")
    one_error(*run_cli(capsys, "demo", "--video", "--steps", "0"), "--steps")
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_a_batch_too_large_for_memory_is_the_users_error(capsys, tmp_path, monkeypatch):
    """The allocator failing (here for real: 10^9 samples of 8x8 latents, 238 GB) is one error line that says how
    much was asked, what is free and what batch to try, not an internal error; the run keeps its files."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "align", "--batch-size", "1000000000", "--steps", "1", "--eval-samples", "2",
                        "--sample-steps", "4", "--no-tensorboard", "--no-progress", "--out", "r")
    one_error(code, err, "ran out of memory")
    assert "--batch-size" in err.splitlines()[-1] and "GB" in err.splitlines()[-1]
    assert (tmp_path / "r" / "chaintune_run.json").is_file()  # the run is there to read, not half-deleted
