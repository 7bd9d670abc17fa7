"""``chaintune align``'s defaults align builtin:digits without hacking the reward, on targets the demo never used.

The defaults were chosen by ``benchmarks/defaults.py`` (docs/results.md, "Defaults"). Each test runs the
CLI with nothing that changes training (``--reward digit:K --out DIR``, plus no tensorboard and no
progress bar) and judges the model the run delivers (``OUT``: by default the kept best evaluation) on 128
fresh seeds: at least 80% of the samples must be the target digit by the held-out classifier (a judge
training never saw) and their distance to the nearest real digit must stay within 1.3x the base model's on
the same seeds (reward hacking drives it towards noise's ~3.5x).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIN_SHARE, MAX_NN_RATIO = 0.8, 1.3
JUDGE_SAMPLES = 128


def _env() -> dict:
    return dict(os.environ, CHAINTUNE_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                MPLBACKEND="Agg")


def _align_with_defaults(digit: int, out: Path, *extra: str) -> None:
    # no time limit: a test judges the model a run delivers, not how long a shared machine took to make it
    proc = subprocess.run([sys.executable, "-m", "chaintune.cli.main", "align", "--reward", f"digit:{digit}",
                           "--out", str(out), "--no-tensorboard", "--no-progress", *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _judge(model_id: str | Path, digit: int) -> dict:
    """The held-out classifier's share of ``digit`` and the nn-distance of 128 samples on fresh seeds (20000+: the
    run's evaluations, which chose the kept model, used 10000+), the default 20-step DDIM chain at eta 1."""
    import torch

    import chaintune
    from chaintune.rewards.evaluation import digit_metrics
    from chaintune.sampling import chain_scheduler, sample

    torch.set_num_threads(1)
    model = chaintune.load(model_id, device="cpu")
    with torch.no_grad():
        images = sample(model, JUDGE_SAMPLES, steps=20, eta=1.0, generator=torch.Generator().manual_seed(20_000),
                        scheduler=chain_scheduler(model, "ddim")).images
    return digit_metrics(images, digit)


def _check(digit: int, tmp_path: Path, *extra: str, min_share: float = MIN_SHARE) -> None:
    """What the user gets is the run's model (OUT, the kept best evaluation by default): judge that."""
    out = tmp_path / f"digit{digit}"
    _align_with_defaults(digit, out, *extra)
    base, tuned = _judge("builtin:digits", digit), _judge(out, digit)
    share, ratio = tuned["class_share"], tuned["nn_distance"] / base["nn_distance"]
    msg = (f"digit:{digit} with defaults {' '.join(extra)}: share {base['class_share']:.0%} -> {share:.0%}, "
           f"nn-distance {base['nn_distance']:.3f} -> {tuned['nn_distance']:.3f} (x{ratio:.2f})")
    print(msg)
    assert share >= min_share, msg
    assert ratio <= MAX_NN_RATIO, msg


@pytest.mark.slow
def test_defaults_align_digit_7(tmp_path):
    """The whole default run (250 steps: 4-5 min of CPU on one thread)."""
    _check(7, tmp_path)


def test_defaults_align_digit_7_in_60_steps(tmp_path):
    """The end-to-end default run CI pays for: every default but --steps 60 (a quarter of the CPU). Measured on
    2026-12-06: share 6% -> 66% at nn-distance 1.18x the base's (evaluation seeds); the bound leaves room for other
    seeds and machines while a run that does not learn (6%) or hacks (nn > 1.3x) fails."""
    _check(7, tmp_path, "--steps", "60", min_share=0.4)


@pytest.mark.slow
@pytest.mark.parametrize("digit", [1, 4, 9])
def test_defaults_align_other_digits(digit, tmp_path):
    _check(digit, tmp_path)


def test_defaults_benchmark_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "defaults.py"), "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "defaults.json").read_text())
    assert {"config", "machine", "base", "settings", "criteria", "stage1", "stage2", "winner", "seconds"} <= set(res)
    rows = res["stage1"]["rows"]
    assert {r["target"] for r in rows} == {"digit:4", "jpeg-compressibility"}
    for r in rows:
        assert {"setting", "target", "seed", "share", "nn_ratio", "diversity_ratio", "reward0", "reward"} <= set(r)
        assert r["nn_ratio"] is not None  # the black-box run's nn-distance is measured on its final samples
    assert (tmp_path / "defaults.png").stat().st_size > 1000
