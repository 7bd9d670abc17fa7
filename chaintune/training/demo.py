"""``chaintune demo``: align builtin:digits to one digit with RLR and a baseline, on a laptop CPU.

Prints a before/after table (reward, held-out reward, share of the target digit judged by a
classifier the training never saw, diversity, wall-clock) and writes the grids and run dirs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from chaintune.training.align import AlignConfig, align, read_metrics

DEMO_DEFAULTS = dict(model="builtin:digits", sample_steps=20, batch_size=32, lr=3e-4, eval_samples=128,
                     save_every=10_000, tensorboard=False)


def demo_config(method: str, digit: int, steps: int, out: Path, seed: int) -> AlignConfig:
    opts = dict(DEMO_DEFAULTS, reward=f"digit:{digit}", steps=steps, eval_every=max(1, steps // 3),
                out=str(out / method), seed=seed)
    if method == "rlr":
        opts.update(estimator="rlr", h=1, zo=False)
    elif method == "rlr+zo":
        opts.update(estimator="rlr", h=1, zo=True)
    elif method in ("reinforce", "ddpo"):
        opts.update(estimator="reinforce")
    else:
        opts.update(estimator=method)
    return AlignConfig(**opts)


def run_demo(out: str | Path, steps: int = 60, digit: int = 3, baseline: str | None = "reinforce",
             seed: int = 0) -> list[dict]:
    out = Path(out)
    methods = ["rlr", "rlr+zo"] + ([baseline] if baseline else [])
    rows = []
    for method in methods:
        cfg = demo_config(method, digit, steps, out, seed)
        t0 = time.time()
        run = align(cfg, overwrite=True)
        dt = time.time() - t0
        metrics = [m for m in read_metrics(run) if "eval/reward" in m]
        first, last = metrics[0], metrics[-1]
        rows.append({"method": method, "reward_before": first["eval/reward"], "reward_after": last["eval/reward"],
                     "share_before": first.get("eval/class_share"), "share_after": last.get("eval/class_share"),
                     "heldout_after": last.get("eval/heldout_reward"), "diversity_before": first["eval/diversity"],
                     "diversity_after": last["eval/diversity"], "seconds": dt,
                     "samples": steps * cfg.batch_size * cfg.grad_accum})
        grids = sorted((run / "samples").glob("step_*.png"))
        shutil.copy(grids[0], out / "before.png")
        shutil.copy(grids[-1], out / f"after_{method}.png")
    print(format_table(rows, digit))
    print(f"\ngrids: {out}/before.png " + " ".join(f"{out}/after_{m}.png" for m in methods))
    print("runs:  " + " ".join(f"{out}/{m}" for m in methods) + "   (chaintune sample --model RUN)")
    return rows


def format_table(rows: list[dict], digit: int) -> str:
    head = (f"{'method':<12} {'reward':>17} {f'share of {digit}s':>17} {'held-out':>9} {'diversity':>15} "
            f"{'samples':>8} {'time':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = (f"{r['share_before']:.0%} -> {r['share_after']:.0%}" if r["share_before"] is not None else "-")
        lines.append(
            f"{r['method']:<12} {r['reward_before']:>7.2f} -> {r['reward_after']:>6.2f} {share:>17} "
            f"{(r['heldout_after'] or float('nan')):>9.2f} {r['diversity_before']:>6.3f} -> {r['diversity_after']:.3f} "
            f"{r['samples']:>8} {r['seconds']:>6.0f}s")
    return "\n".join(lines)
