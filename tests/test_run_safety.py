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
    from chaintune.training.runs import RunLock

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
    import chaintune.training.checkpoint as ck
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
    from chaintune.training import checkpoint as ckpt

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
