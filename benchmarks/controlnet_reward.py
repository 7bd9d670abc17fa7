"""Reward fine-tuning of a ControlNet: RLR, ReFL (ControlNet++'s one-step reward), full backprop and DDPO
against simply training the supervised ControlNet longer.

Start: the supervised ControlNet of the convergence benchmark (``benchmarks/controlnet.py``: builtin:digits-cond,
edge control, Diff-Tuning's psi timesteps, batch 32, LR 3e-4, seed 0) at ``--sup-steps`` (300). From it:

* each estimator fine-tunes the ControlNet (``chaintune align --controlnet RUN --reward edge-consistency``) for
  ``--steps`` x ``--batch-size`` samples (equal samples), T = 20, eta 1, every other option at align's defaults
  (KL 0.01, the hacking guard on, the kept model the best by the held-out reward), 3 seeds (0, 1, 2); each
  method's LR is chosen from ``--lrs`` on seed 3 (not reported) at half the budget, by the held-out reward;
* "supervised +N": the supervised ControlNet trained for the same extra number of steps (one run: the same seed
  and a constant LR reproduce the 300-step ControlNet exactly, then go on).

Every final ControlNet is judged the same way on 50 held-out controls (digits:test) x 4 noises, DDIM eta 0 (how
``chaintune sample`` draws) and the training chain (eta 1), T = 20: ``edge-consistency`` (the training reward),
``edge-chamfer`` (its held-out twin: minus the chamfer distance in pixels), ``condition_iou`` (the supervised
benchmark's metric), ``digit_agreement`` (the digits-cnn labels the sample as the control's digit) and diversity
among the 4 samples of one control. Memory: one estimate's peak extra RSS per method at T = 20 and 50 (forked
child, batch 16).

    python benchmarks/controlnet_reward.py           # ~40 min on 2 busy CPU cores (--jobs 2)
    python benchmarks/controlnet_reward.py --quick   # CI smoke
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

METHODS = ("rlr", "refl", "full-backprop", "ddpo")
SUPERVISED = "supervised"
FULL = dict(sup_steps=300, steps=100, batch_size=16, sample_steps=20, eval_every=25, eval_samples=64,
            lrs=[3e-5, 1e-4, 3e-4], seeds=3, tune_seed=3, judge_controls=50, judge_noises=4, memory_T=[20, 50])
QUICK = dict(sup_steps=4, steps=2, batch_size=4, sample_steps=4, eval_every=1, eval_samples=8, lrs=[1e-4], seeds=1,
             tune_seed=3, judge_controls=2, judge_noises=2, memory_T=[4])
SUP = dict(model="builtin:digits-cond", data="digits:train", condition="edges", method="diff-tuning", batch_size=32,
           lr=3e-4, sample_steps=10, eval_samples=100, grid_samples=8, device="cpu", tensorboard=False, report=False,
           progress=False, save_every=0)


def supervised(steps: int, out: Path, s: dict) -> float:
    """Train the supervised ControlNet for ``steps`` (seed 0) into ``out``; seconds."""
    C.setup_threads(1)
    from chaintune.controlnet.trainer import train_controlnet

    t0 = time.time()
    train_controlnet({**SUP, "steps": steps, "seed": 0, "eval_every": s["sup_steps"]}, out, overwrite=True)
    return time.time() - t0


def fine_tune(method: str, seed: int, lr: float, steps: int, start: Path, out: Path, s: dict) -> dict:
    """One reward fine-tuning run; its evaluation curve."""
    C.setup_threads(1)
    from chaintune.align.config import AlignConfig
    from chaintune.align.objective import align_run

    cfg = AlignConfig.from_dict({"reward": "edge-consistency", "controlnet": str(start), "estimator": method,
                                 "steps": steps, "batch_size": s["batch_size"], "sample_steps": s["sample_steps"],
                                 "eval_every": s["eval_every"], "eval_samples": s["eval_samples"], "lr": lr,
                                 "seed": seed, "device": "cpu", "tensorboard": False, "report": False,
                                 "progress": False, "save_every": 0, "out": str(out)})
    t0 = time.time()
    res = align_run(cfg, overwrite=True, show_progress=False)
    evals = [r for r in res.history if "eval/reward" in r]
    info = json.loads((out / "chaintune_run.json").read_text())
    return {"method": method, "seed": seed, "lr": lr, "seconds": round(time.time() - t0, 1), "out": str(out),
            "steps": [r["step"] for r in evals], "heldout": [r.get("eval/heldout_reward") for r in evals],
            "reward": [r["eval/reward"] for r in evals], "condition_iou": [r.get("eval/condition_iou") for r in evals],
            "hacking": info.get("hacking", [])}


def judge(model_dir: Path, s: dict) -> dict:
    """The common judgement of a final ControlNet (module docstring)."""
    C.setup_threads(1)
    import torch

    from chaintune.align.controls import ControlPool
    from chaintune.backends.controlled import load_controlled
    from chaintune.controlnet.trainer import sample_controlled
    from chaintune.rewards import get_reward

    model = load_controlled(str(model_dir))
    pool = ControlPool.load(model, str(model_dir), "digits:train")
    n = s["judge_controls"] * s["judge_noises"]
    pool.per_control = s["judge_noises"]
    control = pool.heldout_controls(n)
    meta = {"control": control}
    out = {}
    for name, eta in (("eta0", 0.0), ("eta1", 1.0)):
        g = torch.Generator().manual_seed(20_000)
        x_T = torch.randn((n, *model.latent_shape), generator=g)
        images = sample_controlled(model, control, steps=s["sample_steps"], eta=eta, generator=g, x_T=x_T)
        row = {"edge_consistency": float(get_reward("edge-consistency")(images, metadata=meta).mean()),
               "edge_chamfer": float(get_reward("edge-chamfer")(images, metadata=meta).mean())}
        row.update({k.removeprefix("eval/"): v for k, v in pool.metrics(images).items()})
        out[name] = row
    return out


def peak_memory(methods, Ts, s: dict) -> list[dict]:
    """One gradient estimate's peak extra RSS (MiB) on the supervised ControlNet, batch ``batch_size``: the model
    is loaded here, each estimate runs in a forked child (so loading is not counted)."""
    import torch

    import chaintune
    from chaintune.align.controls import ControlPool
    from chaintune.backends.controlled import load_controlled

    C.setup_threads(1)
    model = load_controlled(str(s["start"]))
    model.denoiser.requires_grad_(True)
    control = ControlPool.load(model, str(s["start"]), "digits:train").draw(s["batch_size"],
                                                                           torch.Generator().manual_seed(0))
    rows = []
    for T in Ts:
        for m in methods:
            def probe(m=m, T=T):
                chaintune.estimate_gradient(model, "edge-consistency", m, s["batch_size"], steps=T, control=control,
                                            checkpoint=False)
            rows.append({"method": m, "T": T, **C.measure_in_child(probe)})
    return rows


def _run_all(jobs: list[tuple], workers: int) -> list:
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(fn, *args): i for i, (fn, *args) in enumerate(jobs)}
            done: dict[int, object] = {}
            for f in as_completed(futures):
                done[futures[f]] = f.result()
                C.log(f"  done {len(done)}/{len(jobs)}")
            return [done[i] for i in range(len(jobs))]
    return [fn(*args) for fn, *args in jobs]


def summarise(judged: dict, runs: list[dict]) -> dict:
    out: dict = {}
    for m, rows in judged.items():
        out[m] = {}
        for chain in ("eta0", "eta1"):
            keys = rows[0][chain].keys()
            out[m][chain] = {k: (statistics.mean(r[chain][k] for r in rows),
                                 statistics.stdev(r[chain][k] for r in rows) if len(rows) > 1 else 0.0) for k in keys}
        rs = [r for r in runs if r["method"] == m]
        if rs:
            out[m]["lr"] = rs[0]["lr"]
            out[m]["seconds"] = statistics.mean(r["seconds"] for r in rs)
            out[m]["hacking_alarms"] = sum(len(r["hacking"]) for r in rs)
    return out


def plot(summary: dict, memory: list[dict], path: Path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = list(summary)
    for ax, key in zip(axes[:2], ("condition_iou", "edge_chamfer"), strict=True):
        for k, chain in enumerate(("eta0", "eta1")):
            vals = [summary[m][chain][key] for m in names]
            ax.bar([i + 0.4 * k for i in range(len(names))], [v[0] for v in vals], 0.4,
                   yerr=[v[1] for v in vals], label=f"DDIM {chain.replace('eta', 'eta ')}")
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=20)
        ax.set_title(key.replace("_", " "))
        ax.legend()
    lo = min(summary[m]["eta0"]["condition_iou"][0] for m in names)
    axes[0].set_ylim(max(0, lo - 0.05), None)
    for m in METHODS:
        pts = sorted((r["T"], r["peak_mib"]) for r in memory if r.get("method") == m and "peak_mib" in r)
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=m)
    axes[2].set(xlabel="chain steps T", ylabel="peak extra RSS (MiB)", title="memory of one estimate")
    axes[2].legend()
    fig.suptitle("Reward fine-tuning of a supervised ControlNet (builtin:digits-cond, edges)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (separate processes, 1 thread each)")
    p.add_argument("--name", default="controlnet_reward", help="stem of the result files")
    args = p.parse_args(argv)
    s = dict(QUICK if args.quick else FULL)
    out = C.out_dir(args)
    work = (out / "tmp" if out.resolve() == C.RESULTS.resolve() else out) / f"{args.name}_runs"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    start, longer = work / "supervised", work / "supervised_longer"
    C.log(f"supervised ControlNet: {s['sup_steps']} steps, and {s['sup_steps'] + s['steps']} (the same, trained on)")
    _run_all([(supervised, s["sup_steps"], start, s), (supervised, s["sup_steps"] + s["steps"], longer, s)], args.jobs)
    s["start"] = str(start)

    C.log(f"LR per method on seed {s['tune_seed']} at half the budget: {s['lrs']}")
    half = max(1, s["steps"] // 2)
    tune = _run_all([(fine_tune, m, s["tune_seed"], lr, half, start, work / f"tune_{m}_{lr:g}", s)
                     for m in METHODS for lr in s["lrs"]], args.jobs)
    best = {}
    for m in METHODS:
        rs = [r for r in tune if r["method"] == m]
        best[m] = max(rs, key=lambda r: max((h for h in r["heldout"] if h is not None), default=-1e9))["lr"]
    C.log(f"chosen LRs: {best}")

    C.log(f"{len(METHODS)} methods x {s['seeds']} seeds, {s['steps']} x {s['batch_size']} samples each")
    runs = _run_all([(fine_tune, m, seed, best[m], s["steps"], start, work / f"{m}_s{seed}", s)
                     for seed in range(s["seeds"]) for m in METHODS], args.jobs)
    judged_jobs = [(judge, Path(r["out"]), s) for r in runs] + [(judge, start, s), (judge, longer, s)]
    verdicts = _run_all(judged_jobs, args.jobs)
    judged: dict[str, list] = {f"{SUPERVISED} (start)": [verdicts[-2]],
                               f"{SUPERVISED} +{s['steps']} steps": [verdicts[-1]]}
    for r, v in zip(runs, verdicts[:-2], strict=True):
        judged.setdefault(r["method"], []).append(v)
    memory = peak_memory(METHODS, s["memory_T"], s)
    summary = summarise(judged, runs)
    result = {"benchmark": "controlnet_reward", "settings": {k: v for k, v in s.items() if k != "start"},
              "chosen_lr": best, "tuning": tune, "summary": summary, "judged": judged, "runs": runs,
              "memory": memory, "seconds": round(time.time() - t0, 1), "machine": C.machine()}
    C.write_json(out / f"{args.name}.json", result)
    plot(summary, memory, out / f"{args.name}.png")
    rows = [{"method": m, **{f"{k}_{c}": f"{v[0]:.3f} ± {v[1]:.3f}" for c in ("eta0", "eta1")
                             for k, v in summary[m][c].items() if k in ("condition_iou", "edge_chamfer",
                                                                        "digit_agreement", "diversity")}}
            for m in summary]
    cols = [("method", "method", "")] + [(f"{k}_{c}", f"{k} ({c})", "") for c in ("eta0", "eta1")
                                         for k in ("condition_iou", "edge_chamfer", "digit_agreement", "diversity")]
    print(C.table(rows, cols, title=f"judged on {s['judge_controls']} held-out controls x {s['judge_noises']} noises"))
    for r in memory:
        print(C.memory_row("memory", r))
    print(f"wrote {out / args.name}.json/.png ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
