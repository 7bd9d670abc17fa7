"""Kill a training run with SIGKILL midway, resume it, and get the same final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ARGS = ["--model", "builtin:digits", "--reward", "digit:3", "--estimator", "rlr", "--h", "1", "--zo", "--steps", "8",
        "--save-every", "2", "--batch-size", "4", "--sample-steps", "4", "--eval-every", "100",
        "--eval-samples", "8", "--no-tensorboard", "--lr", "1e-3"]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CHAINTUNE_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "chaintune.cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    full = tmp_path / "full"
    p = _cli("align", "--out", str(full), *ARGS)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err

    cut = tmp_path / "cut"
    p = _cli("align", "--out", str(cut), *ARGS)
    deadline = time.time() + 240
    while time.time() < deadline and not (cut / "checkpoints" / "step_000004" / "trainer.json").exists():
        if p.poll() is not None:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (cut / "model").exists()

    p = _cli("align", "--out", str(cut), "--resume")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [int(line.split('"step": ')[1].split(",")[0].rstrip("}"))
             for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 8 and len(steps) == len(set(steps))


def test_transfer_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    """A transfer run resumed from its mid-run checkpoint ends with the same weights (and EMA)."""
    import shutil

    from chaintune.testing import tiny_unet_model
    from chaintune.transfer import TransferConfig, transfer

    cfg = dict(model="tiny", data="digits-fewshot:2", method="diff-tuning", steps=6, batch_size=8, bank_size=8,
               bank_steps=3, checkpoint_every=3, eval_every=0, grid_samples=4, sample_steps=3, log_every=1,
               feature=None, eval_data=None)
    data = (torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(20, dtype=torch.long))

    def run(out, resume=False):
        model = tiny_unet_model()
        return transfer(TransferConfig.from_dict(cfg), out=out, model=model, target=data, resume=resume,
                        show_progress=False)

    full = run(tmp_path / "full")
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000003", cut / "checkpoints" / "step_000003")
    shutil.copy(tmp_path / "full" / "config.yaml", cut / "config.yaml")
    shutil.copy(tmp_path / "full" / "chaintune_run.json", cut / "chaintune_run.json")
    resumed = run(cut, resume=True)
    for (k, a), b in zip(full.model.denoiser.state_dict().items(), resumed.model.denoiser.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
