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
