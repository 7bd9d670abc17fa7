"""Bad input ends in one clear line on stderr and a non-zero exit — never a traceback or lost data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chaintune.cli.main import main

FAST = ["--steps", "2", "--batch-size", "4", "--sample-steps", "4", "--eval-samples", "4", "--no-tensorboard"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    # progress bars also write to stderr (\r-separated updates); the error itself must be one line
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert code != 0
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def bad_rewards(tmp_path, monkeypatch):
    (tmp_path / "badrewards.py").write_text(textwrap.dedent("""
        import torch
        def nan(images, **kw):
            return torch.full((images.shape[0],), float("nan"))
        def wrong_shape(images, **kw):
            return torch.zeros(images.shape[0], 2)
        def nan_grad(images, **kw):
            # finite value, NaN gradient: d sqrt(0 * x) / dx = inf * 0
            return torch.sqrt(images * 0).flatten(1).sum(1)
        nan_grad.differentiable = True
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "args,needles",
    [
        (["sample", "--model", "builtin:digts", "--num", "2"], ["did you mean builtin:digits"]),
        (["sample", "--model", "/no/such/model/dir", "--num", "2"], ["/no/such/model/dir"]),
        (["align", "--reward", "digt:3", *FAST], ["did you mean 'digit'"]),
        (["align", "--estimator", "rlrr", *FAST], ["did you mean 'rlr'"]),
        (["align", "--h", "30", "--sample-steps", "20", "--steps", "1"], ["h=30"]),
        (["plan", "--memory-budget", "1KB"], ["memory budget"]),
        (["plan", "--memory-budget", "lots"], ["cannot read memory budget"]),
        (["sample", "--num", "2", "--label", "3"], ["not class-conditional"]),
        (["forgetting", "--base", "builtin:digits", "--tuned", "builtin:digits", "--data", "digits:test",
          "--bank-labels", "0,x", "--samples", "0"], ["bank labels", "'0,x'"]),
    ],
    ids=["model-typo", "model-missing", "reward-typo", "estimator-typo", "h-too-large", "budget-too-small",
         "budget-unreadable", "labels-on-unconditional", "bank-labels-unreadable"],
)
def test_bad_names_and_options(capsys, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("fn,needle", [("nan", "NaN"), ("wrong_shape", "shape")])
def test_broken_reward_output(capsys, bad_rewards, fn, needle):
    code, _, err = run_cli(capsys, "align", "--reward", f"badrewards:{fn}", "--estimator", "reinforce",
                           "--out", "run", *FAST)
    assert_one_line_error(code, err, needle)


def test_existing_run_is_refused_and_kept(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "align", "--out", str(run), *FAST)
    assert_one_line_error(code, err, "--resume", "--overwrite")
    assert (run / "precious.txt").read_text() == "keep me"


def test_config_typo_suggests(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.001\nbatch_sise: 4\n")
    code, _, err = run_cli(capsys, "align", "--config", str(cfg), "--out", "run")
    assert_one_line_error(code, err, "batch_sise", "batch_size")
    assert not (tmp_path / "run").exists()


def test_pretrain_config_typo(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("steps: 1\nbatchsize: 4\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", "p.yaml", "--out", "m")
    assert_one_line_error(code, err, "batchsize", "batch_size")
    assert not (tmp_path / "m").exists()


def test_corrupt_checkpoint_on_resume(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    ck.mkdir(parents=True)
    (ck / "trainer.json").write_text("{not json")
    (ck / "trainable.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "align", "--out", "run", "--resume", *FAST)
    assert_one_line_error(code, err, "corrupt")


def test_pickled_weights_refused(capsys, tmp_path, monkeypatch):
    import torch

    from chaintune.testing import tiny_unet

    monkeypatch.chdir(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "m", safe_serialization=False)
    assert list((tmp_path / "m").glob("*.bin"))
    code, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "m"), "--num", "1", "--steps", "2",
                           "--out", "s")
    assert_one_line_error(code, err, "pickled", "--allow-pickle")
    code, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "m"), "--num", "1", "--steps", "2",
                           "--out", "s", "--allow-pickle")
    assert code == 0, err
    del torch


def test_nan_gradients_skip_then_stop_keeping_last_checkpoint(capsys, bad_rewards):
    code, _, err = run_cli(capsys, "align", "--out", "run", "--estimator", "truncated-backprop", "--save-every", "2",
                           *FAST)
    assert code == 0, err
    ckpt = bad_rewards / "run" / "checkpoints" / "step_000002"
    before = (ckpt / "trainable.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "align", "--out", "run", "--resume", "--steps", "6", "--max-bad-steps", "2",
                           "--reward", "badrewards:nan_grad")
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert code != 0 and "Traceback" not in err
    assert any("non-finite gradient" in ln and ln.startswith("warning") for ln in lines)
    assert lines[-1].startswith("error:") and "non-finite" in lines[-1]
    assert (ckpt / "trainable.safetensors").read_bytes() == before
    info = json.loads((bad_rewards / "run" / "chaintune_run.json").read_text())
    assert info["status"].startswith("failed")


def test_subprocess_exit_code_and_single_line():
    """The installed entry point behaves the same as main()."""
    p = subprocess.run([sys.executable, "-m", "chaintune.cli.main", "align", "--estimator", "nope"],
                       capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120)
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.strip()][-1].startswith("error: unknown estimator")
