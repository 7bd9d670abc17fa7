"""``chaintune demo``: align builtin:digits to one digit with RLR and a baseline, on a laptop CPU.

Prints a before/after table (reward, held-out reward, share of the target digit judged by a
classifier the training never saw, diversity, wall-clock) and writes the grids and run dirs.
``chaintune demo --video`` does the same for the text-to-video builtin:moving-digits (:func:`run_video_demo`).
"""

from __future__ import annotations

import time
from pathlib import Path

from chaintune.align.config import AlignConfig
from chaintune.align.objective import align_run
from chaintune.errors import ChaintuneError, unknown_name
from chaintune.run.rundir import check_run_dir
from chaintune.utils.io import atomic_file, check_output_dir, save_json

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
                out=str(out / method), seed=seed)
    if method == "rlr":
        opts.update(RLR_DEMO)
    elif method == "rlr+zo":
        opts.update(estimator="rlr", h=1, zo=True)
    elif method in ("reinforce", "ddpo"):
        opts.update(estimator="reinforce")
    else:
        opts.update(estimator=method)
    opts.update(overrides)
    return AlignConfig.from_dict(opts)


DEMO_MARKER = "chaintune_demo.json"  # in the demo's --out: the files a demo wrote there (it may replace only these)
DEMO_BASELINES = ("reinforce", "ddpo", "grpo", "full-backprop", "truncated-backprop", "alignprop", "refl",
                  "zeroth-order", "half-order", "rlr-released")


def check_demo_outputs(out: Path, files: list[str], runs: list[str]) -> None:
    """Before anything runs: the demo replaces only what an earlier demo wrote in ``out`` (its marker lists the
    files; its runs are chaintune runs), never a file of the user's."""
    import json

    check_output_dir(out)
    marker = out / DEMO_MARKER
    try:
        listed = set(json.loads(marker.read_text()).get("files", [])) if marker.is_file() else set()
    except (OSError, ValueError, AttributeError):
        listed = set()
    clash = [f for f in files if (out / f).exists() and f not in listed]
    if clash:
        raise ChaintuneError(f"{out / clash[0]} exists and was not written by a chaintune demo; move it or choose "
                             "another --out")
    for r in runs:
        check_run_dir(out / r, overwrite=True)


def _record_demo_outputs(out: Path, files: list[str]) -> None:
    import json

    marker = out / DEMO_MARKER
    try:
        old = set(json.loads(marker.read_text()).get("files", [])) if marker.is_file() else set()
    except (OSError, ValueError, AttributeError):
        old = set()
    save_json(marker, {"files": sorted(old | set(files))})


def _delivered(result) -> tuple[dict, dict, int]:
    """(before, delivered metrics, delivered step) of a run: what ``model/`` holds (the kept best evaluation, or the
    last one), so the table, the grid and ``chaintune sample --model RUN`` tell one story."""
    final = result.final
    return result.first_eval, final, int(final.get("best_step", final.get("step", 0)))


def _samples(cfg: AlignConfig) -> int:
    return cfg.optim.steps * cfg.optim.batch_size * cfg.optim.grad_accum


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_file(dst, "wb") as f:
        f.write(src.read_bytes())


def run_demo(out: str | Path, steps: int = 150, digit: int = 3, baseline: str | None = "reinforce",
             seed: int = 0, thread_policy: bool = True, **overrides) -> list[dict]:
    """RLR for ``steps`` optimizer steps; the comparison runs (RLR with ZO, a baseline) for a third as many.

    ``overrides`` replace demo settings (any AlignConfig field, e.g. ``eval_samples``). Each row's "after" is the
    model the run delivers (``model/``: the best evaluation the hacking guard kept), with the step it is from."""

    out = Path(out)
    if steps < 1:
        raise ChaintuneError(f"--steps must be >= 1, got {steps}")
    if not 0 <= digit <= 9:
        raise ChaintuneError(f"--digit must be 0..9, got {digit}")
    if baseline and baseline not in DEMO_BASELINES:
        raise unknown_name("demo baseline", baseline, DEMO_BASELINES)
    methods = ["rlr", "rlr+zo"] + ([baseline] if baseline else [])
    files = ["before.png"] + [f"after_{m}.png" for m in methods]
    cfgs = {m: demo_config(m, digit, steps if m == "rlr" else max(1, steps // 3), out, seed, **overrides)
            for m in methods}
    check_demo_outputs(out, files, methods)
    rows = []
    for method in methods:
        cfg = cfgs[method]
        t0 = time.time()
        result = align_run(cfg, overwrite=True, thread_policy=thread_policy)
        dt = time.time() - t0
        first, kept, kept_step = _delivered(result)
        rows.append({"method": method, "reward_before": first["eval/reward"], "reward_after": kept["eval/reward"],
                     "nn_before": first.get("eval/nn_distance"), "nn_after": kept.get("eval/nn_distance"),
                     "share_before": first.get("eval/class_share"), "share_after": kept.get("eval/class_share"),
                     "heldout_after": kept.get("eval/heldout_reward"), "diversity_before": first["eval/diversity"],
                     "diversity_after": kept["eval/diversity"], "seconds": dt, "kept_step": kept_step,
                     "steps": cfg.optim.steps, "samples": _samples(cfg)})
        samples = result.out / "samples"
        _copy_atomic(samples / "step_000000.png", out / "before.png")
        _copy_atomic(samples / f"step_{kept_step:06d}.png", out / f"after_{method}.png")
        _record_demo_outputs(out, files)
    print(format_table(rows, digit))
    print(f"\ngrids: {out}/before.png " + " ".join(f"{out}/after_{m}.png" for m in methods)
          + "  (after: the model each run delivers)")
    print("runs:  " + " ".join(f"{out}/{m}" for m in methods) + "   (chaintune sample --model RUN)")
    return rows


def _kept(r: dict) -> str:
    """Which step's model a row reports: "250" when the last, "50 of 250" when the guard kept an earlier one."""
    step, steps = r.get("kept_step", r.get("steps")), r.get("steps")
    return f"{step}" if step == steps or steps is None else f"{step} of {steps}"


def format_table(rows: list[dict], digit: int) -> str:
    head = (f"{'method':<10} {'reward':>16} {f'share of {digit}s':>13} {'held-out':>8} {'diversity':>14} "
            f"{'nn-dist':>14} {'model of step':>13} {'samples':>7} {'time':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = (f"{r['share_before']:.0%} -> {r['share_after']:.0%}" if r["share_before"] is not None else "-")
        nn = f"{r['nn_before']:.3f} -> {r['nn_after']:.3f}" if r.get("nn_before") is not None else "-"
        lines.append(
            f"{r['method']:<10} {r['reward_before']:>6.2f} -> {r['reward_after']:>6.2f} {share:>13} "
            f"{(r['heldout_after'] or float('nan')):>8.2f} {r['diversity_before']:.3f} -> {r['diversity_after']:.3f} "
            f"{nn:>14} {_kept(r):>13} {r['samples']:>7} {r['seconds']:>5.0f}s")
    lines.append("after: the model the run delivers (model/), the best evaluation the hacking guard kept; share: "
                 "held-out classifier; nn-dist: distance to the nearest real digit (base 0.12, noise 0.44; rising = "
                 "reward hacking)")
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
                   seed: int = 0, thread_policy: bool = True, **overrides) -> list[dict]:
    """Align builtin:moving-digits with each method for ``steps`` steps; print a before/after table of the
    reward, its held-out twin and the video judge, and write before/after clips as animated GIFs (the "after" of
    each method is the model its run delivers, as in :func:`run_demo`)."""

    out = Path(out)
    if steps < 1:
        raise ChaintuneError(f"--steps must be >= 1, got {steps}")
    for method in methods:
        if method not in VIDEO_METHODS:
            raise ChaintuneError(f"unknown video demo method {method!r}; use {', '.join(VIDEO_METHODS)}")
    files = [f"{name}.{ext}" for name in ("before", *(f"after_{m}" for m in methods)) for ext in ("gif", "png")]
    check_demo_outputs(out, files, list(methods))
    rows = []
    for method in methods:
        opts = dict(VIDEO_DEMO, **VIDEO_METHODS[method], steps=steps, eval_every=max(1, steps // 2),
                    out=str(out / method), seed=seed)
        opts.update(overrides)
        cfg = AlignConfig.from_dict(opts)
        t0 = time.time()
        result = align_run(cfg, overwrite=True, thread_policy=thread_policy)
        dt = time.time() - t0
        first, kept, kept_step = _delivered(result)
        rows.append({"method": method, "before": {k: first.get(k) for k in VIDEO_COLUMNS},
                     "after": {k: kept.get(k) for k in VIDEO_COLUMNS}, "seconds": dt, "kept_step": kept_step,
                     "steps": cfg.optim.steps, "samples": _samples(cfg)})
        samples = result.out / "samples"
        for step, name in ((0, "before"), (kept_step, f"after_{method}")):
            for ext in ("gif", "png"):
                _copy_atomic(samples / f"step_{step:06d}.{ext}", out / f"{name}.{ext}")
        _record_demo_outputs(out, files)
    print(format_video_table(rows))
    print(f"\nclips: {out}/before.gif " + " ".join(f"{out}/after_{m}.gif" for m in methods)
          + "  (PNG strips beside them, each row captioned with its prompt)")
    print("runs:  " + " ".join(f"{out}/{m}" for m in methods)
          + "   (chaintune sample --model RUN --prompt 'a 7 moving left')")
    return rows


def format_video_table(rows: list[dict]) -> str:
    names = {"eval/reward": "reward", "eval/heldout_reward": "held-out", "eval/identity": "identity",
             "eval/direction": "direction", "eval/follows_prompt": "follows", "eval/nn_distance": "nn-dist"}
    head = (f"{'method':<14} " + " ".join(f"{names[k]:>15}" for k in VIDEO_COLUMNS)
            + f" {'model of step':>13} {'samples':>7} {'time':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for k in VIDEO_COLUMNS:
            a, b = r["before"].get(k), r["after"].get(k)
            cells.append("-".rjust(15) if a is None or b is None else f"{a:>6.2f} -> {b:<6.2f}".rjust(15))
        lines.append(f"{r['method']:<14} " + " ".join(cells)
                     + f" {_kept(r):>13} {r['samples']:>7} {r['seconds']:>5.0f}s")
    lines.append("after: the model the run delivers (model/); identity: share of frames the held-out digit MLP reads "
                 "as the prompt's digit; direction: share of "
                 "clips moving the prompt's way (ink centroid); follows: both; nn-dist: frames' distance to the "
                 "nearest real digit (rising = reward hacking)")
    return "\n".join(lines)
