"""Reward alignment of builtin:digits to ``digit:3``: RLR, its ablations and the baselines at equal steps.

Every method runs ``chaintune.training.align`` for the same number of optimizer steps, batch size,
sampling steps, learning rate (AdamW, gradient-norm clip 1.0, all 1.1M UNet parameters) and seed:

=====================  ==================================================================
rlr h=1/2/4            paper eq. 6: FO on step 1, HO span of h steps, ZO on all others
rlr h=2 no-ZO          the paper's "without ZO" ablation (other steps get no gradient)
rlr h=2 no-HO          the paper's "without HO" ablation (span moved to zeroth-order)
truncated k=1          backprop through the last step only (AlignProp k=1 / "1-step backprop")
full-backprop          pathwise through all steps (checkpointed)
reinforce (DDPO)       likelihood ratio at every step, normalised advantages, PPO clip
zeroth-order           ES on every step (mirrored perturbations)
rlr h=2 no-ZO lr=2e-4  the same at twice the learning rate (reward-hacking check)
=====================  ==================================================================

Logged per evaluation (64 held-out seeds): ``eval/reward`` (mean log p(3) under the training
classifier), ``eval/heldout_reward`` (a second classifier training never saw), ``eval/class_share``
(share of samples the held-out classifier calls a 3), ``eval/diversity``, ``eval/nn_distance`` (RMS
distance to the nearest real digit, when the trainer logs it: rises when samples stop looking like
digits). Also: seconds per optimizer step (median), seconds of a no-grad ``chaintune.sample`` of the
same batch, peak memory of one gradient estimate (forked child, see ``_common.py``), and samples
needed to reach a reward level.

    python benchmarks/alignment.py            # 10 methods x 60 steps (about 14 min on 2 CPU cores)
    python benchmarks/alignment.py --quick    # 3 methods x 5 steps (CI smoke, < 90 s)
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

METHODS: dict[str, dict] = {  # every estimator option explicit: AlignConfig's defaults are not pinned
    "rlr h=1": {"estimator": "rlr", "h": 1, "zo": True, "ho": True},
    "rlr h=2": {"estimator": "rlr", "h": 2, "zo": True, "ho": True},
    "rlr h=4": {"estimator": "rlr", "h": 4, "zo": True, "ho": True},
    "rlr h=2 no-ZO": {"estimator": "rlr", "h": 2, "zo": False, "ho": True},
    "rlr h=2 no-HO": {"estimator": "rlr", "h": 2, "zo": True, "ho": False},
    "truncated k=1": {"estimator": "truncated-backprop", "k": 1},
    "full-backprop": {"estimator": "full-backprop"},
    "reinforce (DDPO)": {"estimator": "reinforce"},
    "zeroth-order": {"estimator": "zeroth-order"},
    "rlr h=2 no-ZO lr=2e-4": {"estimator": "rlr", "h": 2, "zo": False, "ho": True, "lr": 2e-4},
}
QUICK = ["rlr h=2 no-ZO", "truncated k=1", "reinforce (DDPO)"]


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method (equal for all)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of method labels")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.eval_every, a.eval_samples, a.methods = 5, 5, 32, ",".join(QUICK)
    a.method_list = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.method_list if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    return a


def config(args, label: str, out: Path):
    from chaintune.training.align import AlignConfig

    opts = dict(model="builtin:digits", reward="digit:3", steps=args.steps, batch_size=args.batch,
                sample_steps=args.sample_steps, lr=args.lr, eval_every=args.eval_every,
                eval_samples=args.eval_samples, save_every=10**9, tensorboard=False, progress=False,
                seed=args.seed, out=str(out), device="cpu", j="uniform", sigma=1e-3, k=1, eta=1.0,
                scheduler="ddim", max_grad_norm=1.0, weight_decay=0.0, warmup_steps=0, peft="none",
                mixed_precision="no", gradient_checkpointing=True, baseline="batch", inner_epochs=1,
                clip_range=1e-4, kl_weight=0.0, retention_weight=0.0, grad_accum=1, heldout_reward="auto")
    opts.update(METHODS[label])
    return AlignConfig.from_dict(opts)


def step_seconds(metrics: list[dict]) -> tuple[float, list[float]]:
    """Median seconds per optimizer step and the cumulative training clock at each step (evaluation
    time excluded: a step interval that contains an evaluation is replaced by the median)."""
    steps = [m for m in metrics if "time" in m]
    diffs = [steps[0]["time"]] + [b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False)]
    evals = {m["step"] for m in metrics if "eval/reward" in m}
    clean = [d for s, d in zip(steps, diffs, strict=True) if s["step"] - 1 not in evals or s["step"] == 1]
    med = statistics.median(clean or diffs)
    clock, t = [0.0], 0.0
    for s, d in zip(steps, diffs, strict=True):
        t += d if (s["step"] - 1 not in evals or s["step"] == 1) else med
        clock.append(t)
    return med, clock


def sample_seconds(model, args, reps: int = 3) -> float:
    import torch

    import chaintune

    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        chaintune.sample(model, args.batch, steps=args.sample_steps, eta=1.0,
                         generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(cfg) -> dict:
    """Peak extra RSS of one gradient estimate of ``cfg``'s estimator (batch, steps, checkpointing as align)."""
    import torch

    import chaintune
    from chaintune.options import flat_values
    from chaintune.training.align import estimator_from_config

    v = flat_values(cfg)
    model = chaintune.load(v["model"])
    model.denoiser.requires_grad_(True)
    chaintune.estimate_gradient(model, v["reward"], "truncated-backprop", n=2, steps=2)  # warm-up

    def work() -> dict:
        chaintune.estimate_gradient(model, v["reward"], estimator_from_config(cfg), n=v["batch_size"],
                                    steps=v["sample_steps"], eta=v["eta"], checkpoint=v["gradient_checkpointing"],
                                    generator=torch.Generator().manual_seed(0))
        return {}

    return C.measure_in_child(work)


def samples_to_reach(run: dict, level: float) -> int | None:
    for e in run["evals"]:
        if e["eval/reward"] >= level:
            return e["samples"]
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    import chaintune
    from chaintune.options import flat_values
    from chaintune.training.align import align, read_metrics

    t_start = time.time()
    base = chaintune.load("builtin:digits")
    sample_s = sample_seconds(base, args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="chaintune-align-bench-") as tmp:
        for label in args.method_list:
            cfg = config(args, label, Path(tmp) / label.replace(" ", "_").replace("=", ""))
            mem = peak_memory(cfg)
            t0 = time.time()
            run_dir = align(cfg, overwrite=True)
            wall = time.time() - t0
            metrics = read_metrics(run_dir)
            med, clock = step_seconds(metrics)
            evals = [{k: v for k, v in m.items() if k.startswith("eval/") or k == "step"}
                     for m in metrics if "eval/reward" in m]
            for e in evals:
                e["samples"] = e["step"] * cfg.optim.batch_size * cfg.optim.grad_accum
                e["train_seconds"] = clock[e["step"]]
            train = [{"step": m["step"], "reward_mean": m["reward_mean"], "grad_norm": m.get("grad_norm")}
                     for m in metrics if "reward_mean" in m]
            run = {"method": label, "config": {k: flat_values(cfg)[k] for k in (
                       "estimator", "h", "zo", "ho", "k", "lr", "sigma", "steps", "batch_size", "sample_steps", "eta")},
                   "evals": evals, "train": train, "sec_per_step": med, "sample_sec_same_batch": sample_s,
                   "step_over_sample": med / sample_s, "wall_seconds": wall,
                   "peak_mib": mem.get("peak_mib"), "memory_error": mem.get("error")}
            runs.append(run)
            first, last = evals[0], evals[-1]
            s0, s1 = first.get("eval/class_share", float("nan")), last.get("eval/class_share", float("nan"))
            C.log(f"  {label:24s} reward {first['eval/reward']:+.3f} -> {last['eval/reward']:+.3f}  "
                  f"share {s0:.0%} -> {s1:.0%}"
                  f"  {med:.2f}s/step  peak {mem.get('peak_mib', float('nan')):.0f} MiB  ({wall:.0f}s)")
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "machine": C.machine(),
              "runs": runs, "seconds": round(time.time() - t_start, 1)}
    result["reach"] = reach(runs)
    out = C.out_dir(args)
    C.write_json(out / "alignment.json", result)
    plot(result, out / "alignment.png")
    print_table(result)
    return result


def reach(runs: list[dict]) -> dict:
    """Samples each method needs to reach (a) the level both faithful RLR (h=2) and DDPO reach, (b) fixed levels."""
    by = {r["method"]: r for r in runs}
    base = runs[0]["evals"][0]["eval/reward"]
    levels: dict[str, float] = {"mean log p(3) >= -3": -3.0, "mean log p(3) >= -1": -1.0,
                                "mean log p(3) >= log 0.5": math.log(0.5)}
    pair = [m for m in ("rlr h=2", "reinforce (DDPO)") if m in by]
    if len(pair) == 2:
        best = min(max(e["eval/reward"] for e in by[m]["evals"][1:]) if len(by[m]["evals"]) > 1 else base
                   for m in pair)
        if best > base + 0.05:
            levels["level both rlr h=2 and DDPO reach"] = best
        else:
            levels["level both rlr h=2 and DDPO reach"] = float("nan")
    out = {"base_reward": base, "levels": levels, "samples": {}}
    for name, lv in levels.items():
        out["samples"][name] = {r["method"]: (samples_to_reach(r, lv) if lv == lv else None) for r in runs}
    return out


def print_table(result: dict) -> None:
    rows = []
    for r in result["runs"]:
        f, last = r["evals"][0], r["evals"][-1]
        best = max(r["evals"], key=lambda e: e["eval/reward"])
        rows.append({"method": r["method"], "r0": f["eval/reward"], "r1": last["eval/reward"],
                     "best": best["eval/reward"], "h1": last.get("eval/heldout_reward"),
                     "s0": f.get("eval/class_share"), "s1": last.get("eval/class_share"),
                     "d1": last.get("eval/diversity"), "d0": f.get("eval/diversity"),
                     "nn0": f.get("eval/nn_distance"), "nn1": last.get("eval/nn_distance"), "sps": r["sec_per_step"],
                     "ratio": r["step_over_sample"], "mem": r["peak_mib"], "samples": last["samples"]})
    cols = [("method", "method", "s"), ("r0", "reward@0", ".3f"), ("r1", "reward@end", ".3f"), ("best", "best", ".3f"),
            ("h1", "heldout@end", ".3f"), ("s0", "3s@0", ".0%"), ("s1", "3s@end", ".0%"), ("d0", "div@0", ".3f"),
            ("d1", "div@end", ".3f"), ("nn0", "nn-dist@0", ".3f"), ("nn1", "nn-dist@end", ".3f"),
            ("sps", "s/step", ".2f"), ("ratio", "step/sample", ".1f"),
            ("mem", "peak MiB", ".0f"), ("samples", "samples", "d")]
    cfg = result["config"]
    print()
    ss = result["runs"][0]["sample_sec_same_batch"]
    print(C.table(rows, cols, title=f"alignment to digit:3 — {cfg['steps']} steps x batch {cfg['batch']}, "
                                    f"{cfg['sample_steps']} DDIM steps, lr {cfg['lr']:g}, seed {cfg['seed']} "
                                    f"(no-grad sample of the batch: {ss:.2f}s)"))
    rc = result["reach"]
    print(f"\nsamples to reach a reward level (base {rc['base_reward']:.3f}; '-' = not reached)")
    for name, lv in rc["levels"].items():
        vals = "  ".join(f"{m}: {v if v is not None else '-'}" for m, v in rc["samples"][name].items())
        print(f"  {name} ({lv:.3f}): {vals}")
    print(f"\ntotal {result['seconds']:.0f}s")


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for r in result["runs"]:
        e = r["evals"]
        ls = "-" if r["method"].startswith("rlr") else "--"
        axes[0].plot([x["samples"] for x in e], [x["eval/reward"] for x in e], ls, marker="o", ms=3, label=r["method"])
        axes[1].plot([x["train_seconds"] for x in e], [x["eval/reward"] for x in e], ls, marker="o", ms=3)
        axes[2].plot([x["samples"] for x in e], [x.get("eval/class_share", float("nan")) for x in e], ls, marker="o",
                     ms=3)
        axes[3].plot([x["samples"] for x in e], [x.get("eval/heldout_reward", float("nan")) for x in e], ls,
                     marker="o", ms=3)
    axes[0].set(xlabel="samples", ylabel="eval reward (log p(3), training classifier)", title="reward vs samples")
    axes[1].set(xlabel="training seconds (eval excluded)", ylabel="eval reward", title="reward vs wall-clock")
    axes[2].set(xlabel="samples", ylabel="share of 3s (held-out classifier)", title="class share")
    axes[3].set(xlabel="samples", ylabel="held-out log p(3)", title="held-out reward")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
