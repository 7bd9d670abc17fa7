"""Multi-process training is exact: 2 gloo processes = 1 process on the union of their batches, and
gradient accumulation = one large batch (gradients and the AdamW update after them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import dist_helpers as td
import pytest
import torch

ONE_PROCESS = SimpleNamespace(num_processes=1)  # what reduce_gradients reads from an Accelerator


def _reference(micro: int) -> dict:
    model, x_T, noises, reward = td.setup()
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    n_micro = td.accumulate(model, reward, x_T, noises, list(range(td.N)), micro)
    return td.one_step(model, params, ONE_PROCESS, n_micro)


def _assert_same(a: dict, b: dict) -> None:
    assert len(a["grads"]) == len(b["grads"]) > 0
    assert sum(float(g.abs().sum()) for g in a["grads"]) > 0
    for x, y in zip(a["grads"], b["grads"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-8)
    for x, y in zip(a["params"], b["params"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_halves_differ_so_the_union_check_has_teeth():
    model, x_T, noises, reward = td.setup()
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    td.accumulate(model, reward, x_T, noises, [0, 1], 1)
    half = [p.grad.clone() for p in params]
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(half, _reference(1)["grads"], strict=True))


def test_gradient_accumulation_equals_one_large_batch():
    _assert_same(_reference(micro=td.N), _reference(micro=1))  # 4 micro-batches of 1 vs one batch of 4


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_processes_equal_one_process_on_the_union(tmp_path):
    results = td.run(tmp_path / "rank0.pt", world=2)
    ref = _reference(micro=1)
    _assert_same(results[1], ref)  # each rank: its half in one micro-batch, then all-reduce
    _assert_same(results[2], ref)  # each rank: its half in two micro-batches, then all-reduce


def test_accelerate_launch_align_two_cpu_processes(tmp_path):
    """`accelerate launch --num_processes 2 --cpu -m chaintune.cli.main align ...` end to end (~20 s)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "chaintune.cli.main", "align", "--model", "builtin:digits", "--reward", "digit:3",
           "--estimator", "rlr", "--steps", "2", "--sample-steps", "4", "--batch-size", "4", "--eval-every", "100",
           "--eval-samples", "4", "--save-every", "100", "--no-tensorboard", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(r.get("reward_mean", 0.0))) for r in rows)
    import chaintune

    assert chaintune.load(out).kind == "unet"
