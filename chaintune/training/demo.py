"""``chaintune demo``: align builtin:digits to one digit with RLR and a baseline, on a laptop CPU.

Prints a before/after table (reward, held-out reward, share of the target digit judged by a
classifier the training never saw, diversity, wall-clock) and writes the grids and run dirs.
``chaintune demo --video`` does the same for the text-to-video builtin:moving-digits (:func:`run_video_demo`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from chaintune.errors import ChaintuneError
from chaintune.training.align import AlignConfig, align, read_metrics

# RLR's demo settings, chosen by measurement (1 thread, 150 steps, batch 32; README, "RLR in practice"). Its
# half-order term is the noise source: one span's likelihood ratio has gradient norm ~40-110 at paper steps
# 10..20 and ~2400 at step 2 (the 1/std of the low-noise end), against ~1.3 for the first-order term, so
# (a) the span is kept in the high-noise half of the chain (j = 10..20), (b) ``spans`` = 4 independently drawn
# spans are averaged (unbiased, RLR docstring), (c) the LR decays (cosine) so the late, noise-driven
# oscillation of the share dies down, and (d) the KL guard is 0.01: RLR's averaged gradient is much smaller
# than DDPO's sum of 19 likelihood ratios, so at 0.1 the guard pins it near 50-60% 3s, at 0.03 near 75%.
RLR_DEMO = dict(estimator="rlr", h=1, zo=False, j="10,20", spans=4, kl_weight=0.01, lr_schedule="cosine")

# The comparison runs are a third as long; a decaying LR there halves their progress (DDPO: 84% -> 55% 3s).
# lr and the KL guard were chosen by measurement (README, Results): without the guard every estimator learns
# to fool the classifier with off-manifold images (eval/nn_distance rises from 0.12 towards noise's 0.44).
DEMO_DEFAULTS = dict(model="builtin:digits", sample_steps=20, batch_size=32, lr=1e-4, kl_weight=0.1,
                     eval_samples=128, save_every=10_000, tensorboard=False)


def demo_config(method: str, digit: int, steps: int, out: Path, seed: int, **overrides) -> AlignConfig:
    opts = dict(DEMO_DEFAULTS, reward=f"digit:{digit}", steps=steps, eval_every=max(1, steps // 3),
                out=str(out / method), seed=seed, **overrides)
    if method == "rlr":
        opts.update(RLR_DEMO)
        opts.update(overrides)
    elif method == "rlr+zo":
        opts.update(estimator="rlr", h=1, zo=True)
    elif method in ("reinforce", "ddpo"):
        opts.update(estimator="reinforce")
    else:
        opts.update(estimator=method)
    return AlignConfig.from_dict(opts)


def run_demo(out: str | Path, steps: int = 150, digit: int = 3, baseline: str | None = "reinforce",
             seed: int = 0, **overrides) -> list[dict]:
    """RLR for ``steps`` optimizer steps; the comparison runs (RLR with ZO, a baseline) for a third as many.

    ``overrides`` replace demo settings (any AlignConfig field, e.g. ``eval_samples``)."""
    out = Path(out)
    methods = ["rlr", "rlr+zo"] + ([baseline] if baseline else [])
    rows = []
    for method in methods:
        cfg = demo_config(method, digit, steps if method == "rlr" else max(1, steps // 3), out, seed, **overrides)
        t0 = time.time()
        run = align(cfg, overwrite=True)
        dt = time.time() - t0
        metrics = [m for m in read_metrics(run) if "eval/reward" in m]
        first, last = metrics[0], metrics[-1]
        rows.append({"method": method, "reward_before": first["eval/reward"], "reward_after": last["eval/reward"],
                     "nn_before": first.get("eval/nn_distance"), "nn_after": last.get("eval/nn_distance"),
                     "share_before": first.get("eval/class_share"), "share_after": last.get("eval/class_share"),
                     "heldout_after": last.get("eval/heldout_reward"), "diversity_before": first["eval/diversity"],
                     "diversity_after": last["eval/diversity"], "seconds": dt,
                     "samples": cfg.optim.steps * cfg.optim.batch_size * cfg.optim.grad_accum})
        grids = sorted((run / "samples").glob("step_*.png"))
        shutil.copy(grids[0], out / "before.png")
        shutil.copy(grids[-1], out / f"after_{method}.png")
    print(format_table(rows, digit))
    print(f"\ngrids: {out}/before.png " + " ".join(f"{out}/after_{m}.png" for m in methods))
    print("runs:  " + " ".join(f"{out}/{m}" for m in methods) + "   (chaintune sample --model RUN)")
    return rows


def format_table(rows: list[dict], digit: int) -> str:
    head = (f"{'method':<10} {'reward':>16} {f'share of {digit}s':>13} {'held-out':>8} {'diversity':>14} "
            f"{'nn-dist':>14} {'samples':>7} {'time':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = (f"{r['share_before']:.0%} -> {r['share_after']:.0%}" if r["share_before"] is not None else "-")
        nn = f"{r['nn_before']:.3f} -> {r['nn_after']:.3f}" if r.get("nn_before") is not None else "-"
        lines.append(
            f"{r['method']:<10} {r['reward_before']:>6.2f} -> {r['reward_after']:>6.2f} {share:>13} "
            f"{(r['heldout_after'] or float('nan')):>8.2f} {r['diversity_before']:.3f} -> {r['diversity_after']:.3f} "
            f"{nn:>14} {r['samples']:>7} {r['seconds']:>5.0f}s")
    lines.append("share: held-out classifier; nn-dist: distance to the nearest real digit (base 0.12, noise 0.44; "
                 "rising = reward hacking)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ video

# The video demo: builtin:moving-digits aligned to prompt fidelity (``moving-digit``: the prompt's digit in
# every frame) with RLR and full backprop through the chain, 30 steps of 16 clips over a 10-step chain (a few
# minutes on 2 cores); everything else is `chaintune align`'s defaults. Each method's LR is the best measured on
# this task (docs/results.md, "Video"): full backprop 3e-4 (at 1e-3 it collapses by step 15 and only the hacking
# guard's rollback saves the run); RLR 1e-4, the best of 1e-4, 3e-4 and 1e-3 — above 1e-4 every RLR variant
# tried (h = 1, 3, 5; j = 6,10; the released variant with c = 0.1 or 0) loses reward.
VIDEO_DEMO = dict(model="builtin:moving-digits", reward="moving-digit", sample_steps=10, batch_size=16,
                  eval_samples=32, save_every=10_000, tensorboard=False)
VIDEO_METHODS = {"rlr": dict(estimator="rlr", lr=1e-4), "full-backprop": dict(estimator="full-backprop", lr=3e-4)}
VIDEO_COLUMNS = ("eval/reward", "eval/heldout_reward", "eval/identity", "eval/direction", "eval/follows_prompt",
                 "eval/nn_distance")


def run_video_demo(out: str | Path, steps: int = 30, methods: tuple[str, ...] = ("rlr", "full-backprop"),
                   seed: int = 0, **overrides) -> list[dict]:
    """Align builtin:moving-digits with each method for ``steps`` steps; print a before/after table of the
    reward, its held-out twin and the video judge, and write before/after clips as animated GIFs."""
    out = Path(out)
    rows = []
    for method in methods:
        if method not in VIDEO_METHODS:
            raise ChaintuneError(f"unknown video demo method {method!r}; use {', '.join(VIDEO_METHODS)}")
        opts = dict(VIDEO_DEMO, **VIDEO_METHODS[method], steps=steps, eval_every=max(1, steps // 2),
                    out=str(out / method), seed=seed)
        opts.update(overrides)
        cfg = AlignConfig.from_dict(opts)
        t0 = time.time()
        run = align(cfg, overwrite=True)
        dt = time.time() - t0
        evals = [m for m in read_metrics(run) if "eval/reward" in m]
        rows.append({"method": method, "before": {k: evals[0].get(k) for k in VIDEO_COLUMNS},
                     "after": {k: evals[-1].get(k) for k in VIDEO_COLUMNS}, "seconds": dt,
                     "samples": cfg.optim.steps * cfg.optim.batch_size * cfg.optim.grad_accum})
        clips = sorted((run / "samples").glob("step_*.gif"))
        for src, name in ((clips[0], "before"), (clips[-1], f"after_{method}")):
            shutil.copy(src, out / f"{name}.gif")
            shutil.copy(src.with_suffix(".png"), out / f"{name}.png")
    print(format_video_table(rows))
    print(f"\nclips: {out}/before.gif " + " ".join(f"{out}/after_{m}.gif" for m in methods)
          + "  (PNG strips beside them)")
    print("runs:  " + " ".join(f"{out}/{m}" for m in methods)
          + "   (chaintune sample --model RUN --prompt 'a 7 moving left')")
    return rows


def format_video_table(rows: list[dict]) -> str:
    names = {"eval/reward": "reward", "eval/heldout_reward": "held-out", "eval/identity": "identity",
             "eval/direction": "direction", "eval/follows_prompt": "follows", "eval/nn_distance": "nn-dist"}
    head = f"{'method':<14} " + " ".join(f"{names[k]:>15}" for k in VIDEO_COLUMNS) + f" {'samples':>7} {'time':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for k in VIDEO_COLUMNS:
            a, b = r["before"].get(k), r["after"].get(k)
            cells.append("-".rjust(15) if a is None or b is None else f"{a:>6.2f} -> {b:<6.2f}".rjust(15))
        lines.append(f"{r['method']:<14} " + " ".join(cells) + f" {r['samples']:>7} {r['seconds']:>5.0f}s")
    lines.append("identity: share of frames the held-out digit MLP reads as the prompt's digit; direction: share of "
                 "clips moving the prompt's way (ink centroid); follows: both; nn-dist: frames' distance to the "
                 "nearest real digit (rising = reward hacking)")
    return "\n".join(lines)
