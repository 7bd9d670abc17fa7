"""Reward alignment of builtin:digits to ``digit:3``: RLR, its ablations and the baselines at equal steps.

Every method runs ``chaintune.align`` for the same number of optimizer steps, batch size,
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
    python benchmarks/alignment.py --ranking  # the ranking at the final defaults (see ``ranking_main``)
    python benchmarks/alignment.py --ranking --quick   # its smoke run (2 methods x 1 LR x 1 seed x 3 steps)

``--ranking``: the estimator ranking with AlignConfig's final defaults (cosine LR, KL 0.01, the hacking
guard with rollback and best-evaluation final model, rlr spans 4), reward ``digit:5`` (not the demo's
``digit:3``), judged by the held-out classifier's share of 5s and the nn-distance realism check.
Stage 1 runs every method at 2 LRs (1 seed) and picks the LR with the highest final held-out share
among runs whose final nn-distance is <= 1.3x the base model's (else the lowest nn-distance);
stage 2 runs more seeds at the chosen LR (stage 1's seed is reused). Equal samples (same steps x
batch) for all; reward at equal wall-clock interpolates each run's eval curve (eval/reward vs
training seconds) at the slowest-common time (the shortest run's training clock). Runs go in
``--workers`` parallel processes (one torch thread each). Only the differentiable reward is
ranked: the registry has no black-box wrapper of ``digit:5`` (and jpeg-compressibility is flat at
8x8), so the black-box-only comparison is not run here.
"""

from __future__ import annotations

import contextlib
import json
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

# The ranking (``--ranking``): estimator options only; everything else is AlignConfig's default.
RANKING: dict[str, dict] = {
    "rlr h=1": {"estimator": "rlr", "h": 1, "zo": False},
    "rlr h=2": {"estimator": "rlr", "h": 2, "zo": False},
    "rlr h=2 +ZO": {"estimator": "rlr", "h": 2, "zo": True},
    "alignprop k=1": {"estimator": "alignprop", "k": 1},
    "ddpo (reinforce)": {"estimator": "reinforce"},
    "grpo (batch group)": {"estimator": "grpo"},
    "full-backprop": {"estimator": "full-backprop"},
    "refl": {"estimator": "refl"},
    "zeroth-order": {"estimator": "zeroth-order"},
}
RANKING_QUICK = ["rlr h=1", "ddpo (reinforce)"]
# Relative cost of a step (measured s/step in the 30-step ranking): the costliest runs start first, so the
# worker pool does not end on one long run.
_COST = {"rlr h=2 +ZO": 5, "ddpo (reinforce)": 3, "grpo (batch group)": 2, "full-backprop": 2, "rlr h=2": 1.5}


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method (equal for all)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--methods", default=None, help="comma list of method labels")
    p.add_argument("--ranking", action="store_true", help="the estimator ranking at the final defaults")
    p.add_argument("--lrs", default="1e-4,3e-4", help="--ranking: LRs of the selection stage")
    p.add_argument("--seeds", type=int, default=3, help="--ranking: seeds at the chosen LR")
    p.add_argument("--workers", type=int, default=2, help="--ranking: parallel run processes")
    p.add_argument("--reward", default="digit:5", help="--ranking: training reward")
    p.add_argument("--partial", default=None, help="--ranking: write finished runs here as they come")
    p.add_argument("--chosen-lrs", default="{}",
                   help='--ranking: JSON {"method": lr} of LRs chosen by an earlier selection stage; those methods '
                        "skip stage 1 and run --seeds seeds from --seed at that LR")
    p.add_argument("--reuse", type=Path, action="append", default=[],
                   help="--ranking: a --partial file of an earlier, interrupted ranking with the same settings; its "
                        "runs (method, LR, seed) are taken instead of run again")
    p.add_argument("--name", default="ranking", help="--ranking: result file stem (NAME.json, NAME.png)")
    a = p.parse_args(argv)
    if a.ranking:
        a.methods = a.methods or ",".join(RANKING)
        if a.quick:
            a.steps, a.batch, a.sample_steps, a.eval_every, a.eval_samples = 3, 8, 8, 3, 16
            a.methods, a.lrs, a.seeds = ",".join(RANKING_QUICK), "1e-4", 1
        a.method_list = [m for m in a.methods.split(",") if m]
        a.lr_list = [float(x) for x in a.lrs.split(",") if x]
        a.chosen_lr_map = {m: float(v) for m, v in json.loads(a.chosen_lrs).items() if m in a.method_list}
        bad = [m for m in a.method_list if m not in RANKING]
        if bad:
            p.error(f"unknown methods {bad}; choose from {list(RANKING)}")
        return a
    a.methods = a.methods or ",".join(METHODS)
    if a.quick:
        a.steps, a.eval_every, a.eval_samples, a.methods = 5, 5, 32, ",".join(QUICK)
    a.method_list = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.method_list if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    return a


def config(args, label: str, out: Path):
    from chaintune.align import AlignConfig

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
    from chaintune.align import estimator_from_config
    from chaintune.options import flat_values

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
    if args.ranking:
        return ranking_main(args)
    C.setup_threads(1)
    import chaintune
    from chaintune.align import align, read_metrics
    from chaintune.options import flat_values

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


# ---------------------------------------------------------------- the ranking at the final defaults


def ranking_config(args, label: str, lr: float, seed: int, out: Path):
    from chaintune.align import AlignConfig

    opts = dict(model="builtin:digits", reward=args.reward, steps=args.steps, batch_size=args.batch,
                sample_steps=args.sample_steps, lr=lr, eval_every=args.eval_every, eval_samples=args.eval_samples,
                save_every=0, tensorboard=False, progress=False, report=False, seed=seed, out=str(out),
                device="cpu")
    opts.update(RANKING[label])
    return AlignConfig.from_dict(opts)


def _ranking_run(job: tuple) -> dict:
    """One alignment run (in a worker process): its eval curve on the training clock."""
    args, label, lr, seed, out = job
    C.setup_threads(1)
    from chaintune.align import align, read_metrics
    from chaintune.options import flat_values

    cfg = ranking_config(args, label, lr, seed, Path(out))
    t0 = time.time()
    try:
        run_dir = align(cfg, overwrite=True)
    except Exception as e:  # noqa: BLE001 - a failed run is reported, not fatal
        return {"method": label, "lr": lr, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    wall = time.time() - t0
    metrics = read_metrics(run_dir)
    med, clock = step_seconds(metrics)
    evals = []
    for m in metrics:
        if "eval/reward" in m:
            e = {k: v for k, v in m.items() if k.startswith("eval/") or k == "step"}
            e["samples"] = e["step"] * cfg.optim.batch_size * cfg.optim.grad_accum
            e["train_seconds"] = clock[min(e["step"], len(clock) - 1)]
            evals.append(e)
    events = json.loads((Path(run_dir) / "chaintune_run.json").read_text()).get("hacking", [])  # the guard's actions
    v = flat_values(cfg)
    return {"method": label, "lr": lr, "seed": seed, "evals": evals, "sec_per_step": med, "wall_seconds": wall,
            "guard_events": events, "config": {k: v[k] for k in (
                "estimator", "h", "zo", "spans", "k", "lr", "lr_schedule", "kl_weight", "on_hacking",
                "final_model", "steps", "batch_size", "sample_steps")}}


def _final(run: dict, key: str) -> float:
    return run["evals"][-1].get(key, float("nan")) if run.get("evals") else float("nan")


def _delivered(run: dict) -> dict:
    """The evaluation whose weights the run saves as its model (``final_model best``, the default; with ``last``
    the final one): the best held-out reward among the evaluations without a hacking alarm, found by replaying
    the trainer's guard over the logged evaluations in order (the trainer keeps a best only when there is none)."""
    from chaintune.align import HackingGuard
    from chaintune.align.config import GuardConfig

    evals = run.get("evals", [])
    if not evals or run.get("config", {}).get("final_model") == "last" or "eval/heldout_reward" not in evals[0]:
        return evals[-1] if evals else {}
    g = GuardConfig()  # the ranking runs with the guard's defaults
    guard, best = HackingGuard(g.realism_tolerance, g.collapse_ratio), None
    for e in evals:
        if guard.alarm(dict(e)) is None and (best is None or e["eval/heldout_reward"] > best["eval/heldout_reward"]):
            best = e
    return best or evals[-1]


def _by_cost(jobs: list[tuple]) -> list[tuple]:
    return sorted(jobs, key=lambda j: -_COST.get(j[1], 1))


def _interp(run: dict, t: float, key: str = "eval/reward") -> float:
    pts = [(e["train_seconds"], e.get(key, float("nan"))) for e in run.get("evals", [])]
    if not pts:
        return float("nan")
    if t <= pts[0][0]:
        return pts[0][1]
    for (t0, y0), (t1, y1) in zip(pts, pts[1:], strict=False):
        if t0 <= t <= t1:
            return y0 if t1 == t0 else y0 + (y1 - y0) * (t - t0) / (t1 - t0)
    return pts[-1][1]


def _runs_in(f: Path) -> list[dict]:
    """The runs of a --partial list, or of a finished ranking's JSON (stage 1 and 2)."""
    data = json.loads(f.read_text())
    return data if isinstance(data, list) else [*data.get("stage1", []), *data.get("stage2", [])]


def _run_parallel(args, jobs: list[tuple]) -> list[dict]:
    import multiprocessing as mp

    done = {(r["method"], r["lr"], r["seed"]): r for f in getattr(args, "reuse", []) for r in _runs_in(f)
            if r.get("evals")}
    reused = [done[(j[1], j[2], j[3])] for j in jobs if (j[1], j[2], j[3]) in done]
    jobs = [j for j in jobs if (j[1], j[2], j[3]) not in done]
    if reused:
        C.log(f"  reused {len(reused)} finished runs, {len(jobs)} to run")
    if not jobs:
        return reused
    out = list(reused)
    # spawn, not fork: a worker forked from this process (torch's threads running) can deadlock on a lock
    pool = mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) if args.workers > 1 else None
    with pool or contextlib.nullcontext():
        for r in (pool.imap_unordered(_ranking_run, jobs) if pool else map(_ranking_run, jobs)):
            C.log(f"  {r['method']:20s} lr {r['lr']:g} seed {r['seed']}: "
                  + (r["error"] if "error" in r else
                     f"share {_final(r, 'eval/class_share'):.0%}  nn {_final(r, 'eval/nn_distance'):.3f}  "
                     f"{r['wall_seconds']:.0f}s"))
            out.append(r)
            if getattr(args, "partial", None):  # every finished run of this ranking so far, every stage
                args.finished = [*getattr(args, "finished", []), r]
                C.write_json(Path(args.partial), [*done.values(), *args.finished])
    return out


def ranking_main(args) -> dict:
    t_start = time.time()
    tol = 1.3
    with tempfile.TemporaryDirectory(prefix="chaintune-ranking-") as tmp:
        def job(label, lr, seed):
            return (args, label, lr, seed, str(Path(tmp) / f"{label.replace(' ', '_')}-{lr:g}-{seed}"))

        select = [m for m in args.method_list if m not in args.chosen_lr_map]
        C.log(f"stage 1: LR selection ({len(select)} methods x {len(args.lr_list)} LRs, seed {args.seed}); "
              f"LRs given: {args.chosen_lr_map}")
        stage1 = _run_parallel(args, _by_cost([job(m, lr, args.seed) for m in select for lr in args.lr_list]))
        ok = [r for r in stage1 if r.get("evals")]
        chosen: dict[str, float] = dict(args.chosen_lr_map)
        for m in select:
            cands = [r for r in ok if r["method"] == m]
            if not cands:
                continue
            base = cands[0]["evals"][0].get("eval/nn_distance", float("nan"))  # step 0: the base model
            real = [r for r in cands if _final(r, "eval/nn_distance") <= tol * base]
            pick = (max(real, key=lambda r: (_final(r, "eval/class_share"), _final(r, "eval/reward"))) if real
                    else min(cands, key=lambda r: _final(r, "eval/nn_distance")))
            chosen[m] = pick["lr"]
        C.log(f"chosen LRs: {chosen}")
        jobs = [job(m, chosen[m], args.seed + i) for m in chosen for i in range(args.seeds)
                if m in args.chosen_lr_map or i > 0]  # stage 1 already ran the first seed of the selected ones
        stage2 = _run_parallel(args, _by_cost(jobs)) if jobs else []
    done = [r for r in stage1 + stage2 if r.get("evals")]
    base_nn = statistics.median(r["evals"][0]["eval/nn_distance"] for r in done
                                if "eval/nn_distance" in r["evals"][0]) if done else float("nan")
    final_runs = {m: [r for r in stage1 + stage2 if r["method"] == m and r["lr"] == chosen[m] and r.get("evals")]
                  for m in chosen}
    t_common = min((r["evals"][-1]["train_seconds"] for rs in final_runs.values() for r in rs), default=float("nan"))
    firsts = [r["evals"][0] for rs in final_runs.values() for r in rs]  # step 0: the base model, every seed
    base_share = statistics.mean(e.get("eval/class_share", float("nan")) for e in firsts) if firsts else float("nan")
    rows = []
    for m, rs in final_runs.items():
        def ms(xs):
            xs = [x for x in xs if x == x]
            return (statistics.mean(xs) if xs else float("nan"),
                    statistics.stdev(xs) if len(xs) > 1 else float("nan"))

        share = ms([_final(r, "eval/class_share") for r in rs])
        nn = ms([_final(r, "eval/nn_distance") / base_nn for r in rs])
        rew = ms([_final(r, "eval/reward") for r in rs])
        rew_t = ms([_interp(r, t_common) for r in rs])
        share_t = ms([_interp(r, t_common, "eval/class_share") for r in rs])
        delivered = [_delivered(r) for r in rs]
        kept = ms([e.get("eval/class_share", float("nan")) for e in delivered])
        kept_nn = ms([e.get("eval/nn_distance", float("nan")) / base_nn for e in delivered])
        rows.append({"method": m, "lr": chosen[m], "seeds": len(rs), "share": share[0], "share_std": share[1],
                     "nn_ratio": nn[0], "reward": rew[0], "reward_std": rew[1], "reward_at_t": rew_t[0],
                     "reward_at_t_std": rew_t[1], "share_at_t": share_t[0],
                     "delivered_share": kept[0], "delivered_share_std": kept[1], "delivered_nn_ratio": kept_nn[0],
                     "per_seed_share": [_final(r, "eval/class_share") for r in rs],
                     "per_seed_delivered": [e.get("eval/class_share") for e in delivered],
                     "sec_per_step": statistics.median(r["sec_per_step"] for r in rs)})
    rows.sort(key=lambda r: -r["share"] if r["share"] == r["share"] else 1.0)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "machine": C.machine(),
              "base": {"nn_distance": base_nn, "class_share": base_share}, "nn_tolerance": tol, "chosen_lr": chosen,
              "common_seconds": t_common, "table": rows, "stage1": stage1, "stage2": stage2,
              "failed": [r for r in stage1 + stage2 if "error" in r], "seconds": round(time.time() - t_start, 1)}
    # runs of an earlier, interrupted ranking (--reuse) at an LR not chosen here: its LR-selection stage
    result["reused_selection"] = [r for f in args.reuse for r in _runs_in(f) if r.get("evals")
                                  and chosen.get(r["method"]) not in (None, r["lr"])]
    out = C.out_dir(args)
    C.write_json(out / f"{args.name}.json", result)
    plot_ranking(result, final_runs, out / f"{args.name}.png")
    print_ranking(result)
    return result


def print_ranking(result: dict) -> None:
    cfg = result["config"]
    cols = [("method", "method", "s"), ("lr", "LR", "g"), ("seeds", "seeds", "d"), ("share", "share", ".1%"),
            ("share_std", "±std", ".1%"), ("nn_ratio", "nn/base", ".2f"), ("reward", "reward@end", ".3f"),
            ("reward_at_t", f"reward@{result['common_seconds']:.0f}s", ".3f"), ("share_at_t", "share@t", ".1%"),
            ("delivered_share", "kept", ".1%"), ("delivered_nn_ratio", "kept nn", ".2f"),
            ("sec_per_step", "s/step", ".2f")]
    print()
    print(C.table(result["table"], cols, title=(
        f"ranking on {cfg['reward']} at the final defaults — {cfg['steps']} steps x batch {cfg['batch']}, "
        f"{cfg['sample_steps']} DDIM steps; held-out share of the class (base {result['base']['class_share']:.1%}), "
        f"nn-distance / base {result['base']['nn_distance']:.3f}")))
    if result["failed"]:
        print("failed runs:", [(r["method"], r["lr"], r["seed"], r["error"]) for r in result["failed"]])
    print(f"\ntotal {result['seconds']:.0f}s")


def plot_ranking(result: dict, final_runs: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (m, rs) in enumerate(final_runs.items()):
        c = colors[i % len(colors)]
        for j, r in enumerate(rs):
            e = r["evals"]
            lab = m if j == 0 else None
            axes[0].plot([x["samples"] for x in e], [x["eval/reward"] for x in e], color=c, alpha=.7, label=lab)
            axes[1].plot([x["train_seconds"] for x in e], [x["eval/reward"] for x in e], color=c, alpha=.7)
            axes[2].plot([x["samples"] for x in e], [x.get("eval/class_share", float("nan")) for x in e], color=c,
                         alpha=.7)
    t = result["common_seconds"]
    if t == t:
        axes[1].axvline(t, color="k", ls=":", lw=1)
    axes[0].set(xlabel="samples", ylabel="eval reward (training classifier)", title="reward vs samples")
    axes[1].set(xlabel="training seconds (eval excluded)", ylabel="eval reward", title="reward vs wall-clock")
    axes[2].set(xlabel="samples", ylabel="held-out class share", title="held-out class share")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
