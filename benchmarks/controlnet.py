"""ControlNet convergence: Diff-Tuning's psi timesteps vs plain uniform ones ("sudden convergence").

Diff-Tuning reports that a ControlNet trained with its timestep law converges about 24% faster. Here a
ControlNet (``chaintune controlnet``) learns to steer the frozen ``builtin:digits-cond`` base (16x16 pixel
digits, class token in ``encoder_hidden_states``) to draw the digit whose **edge map** (Sobel, thresholded)
is given, in the pose it shows. Both methods share everything — the ControlNet's initialisation, data order,
batch, LR, evaluation noise — except the law t is drawn from: psi(t) ∝ (t + 1)^alpha (diff-tuning, alpha 1)
or uniform (plain).

Measured every ``--eval-every`` steps, on ``--eval-samples`` held-out digits (digits:test), sampling the *null*
class (the control alone must carry the digit) with DDIM eta 0 and fixed noise:

* ``condition_iou``: IoU of the sample's edge map with the condition (the no-op ControlNet scores what an
  unsteered sample scores; a perfect follower approaches the IoU of a digit with itself, 1);
* ``digit_agreement``: share of samples the shipped digits-cnn classifier labels as the condition's digit.

Convergence step: the first step at which a run's condition_iou reaches ``--threshold`` (linear
interpolation between the two evaluations around the crossing; ``null`` when a run never reaches it). The
threshold (0.68) was fixed before the runs from a 200-step pilot of seed 0 (no-op 0.60, both methods past 0.70
by step 200). Secondary: the first step with digit_agreement >= ``--digit-threshold`` (0.3; no-op 0.12).
Reported per seed, as mean ± std over seeds, and the ratio diff-tuning / plain (< 1: psi converges faster).

    python benchmarks/controlnet.py            # 5 seeds x 2 methods, 300 steps; ~15-25 min on 2 busy CPU cores
    python benchmarks/controlnet.py --quick    # CI smoke (< 60 s)
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

METHODS = ("diff-tuning", "plain")
# thresholds fixed from a 200-step pilot (seed 0): the no-op scores IoU 0.60 and digit agreement 0.12; both
# methods then rise suddenly, to IoU 0.71-0.74 and agreement 0.30-0.47 by step 200
FULL = dict(steps=300, eval_every=20, eval_samples=100, sample_steps=10, batch_size=32, lr=3e-4, seeds=5,
            threshold=0.68, digit_threshold=0.3)
QUICK = dict(steps=6, eval_every=3, eval_samples=8, sample_steps=3, batch_size=8, lr=3e-4, seeds=1, threshold=0.68,
             digit_threshold=0.3)


def one_run(method: str, seed: int, s: dict) -> dict:
    """Train one ControlNet; its evaluation curve."""
    C.setup_threads(1)
    import chaintune
    from chaintune.controlnet.trainer import train_controlnet

    cfg = {"model": "builtin:digits-cond", "data": "digits:train", "condition": s["condition"], "method": method,
           "steps": s["steps"], "batch_size": s["batch_size"], "lr": s["lr"], "eval_every": s["eval_every"],
           "eval_samples": s["eval_samples"], "sample_steps": s["sample_steps"], "grid_samples": 8, "seed": seed,
           "device": "cpu", "tensorboard": False, "report": False, "progress": False, "save_every": 0}
    t0 = time.time()
    res = train_controlnet(cfg, None, base=chaintune.load("builtin:digits-cond"), show_progress=False)
    rows = [r for r in res.history if "eval/condition_iou" in r]
    return {"method": method, "seed": seed, "seconds": round(time.time() - t0, 1),
            "steps": [r["step"] for r in rows], "condition_iou": [r["eval/condition_iou"] for r in rows],
            "digit_agreement": [r.get("eval/digit_agreement") for r in rows],
            "loss": [r.get("loss") for r in res.history if "loss" in r]}


def crossing(steps: list[int], values: list[float], threshold: float) -> float | None:
    """First step at which ``values`` reach ``threshold`` (linear interpolation between evaluations)."""
    for i, v in enumerate(values):
        if v >= threshold:
            if i == 0:
                return float(steps[0])
            s0, s1, v0 = steps[i - 1], steps[i], values[i - 1]
            return s0 + (s1 - s0) * (threshold - v0) / (v - v0)
    return None


def summarise(runs: list[dict], threshold: float, digit_threshold: float) -> dict:
    out: dict = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        cross = {r["seed"]: crossing(r["steps"], r["condition_iou"], threshold) for r in rs}
        hit = [c for c in cross.values() if c is not None]
        digit = {r["seed"]: crossing(r["steps"], r["digit_agreement"], digit_threshold) for r in rs}
        dhit = [c for c in digit.values() if c is not None]
        out[m] = {"convergence_step": cross, "mean": statistics.mean(hit) if hit else None,
                  "std": statistics.stdev(hit) if len(hit) > 1 else 0.0, "reached": f"{len(hit)}/{len(rs)}",
                  "digit_convergence_step": digit, "digit_mean": statistics.mean(dhit) if dhit else None,
                  "digit_reached": f"{len(dhit)}/{len(rs)}",
                  "final_condition_iou": statistics.mean(r["condition_iou"][-1] for r in rs),
                  "final_digit_agreement": statistics.mean(r["digit_agreement"][-1] or 0 for r in rs)}
    a, b = out["diff-tuning"]["mean"], out["plain"]["mean"]
    out["ratio_diff_tuning_over_plain"] = a / b if a is not None and b else None
    a, b = out["diff-tuning"]["digit_mean"], out["plain"]["digit_mean"]
    out["digit_ratio_diff_tuning_over_plain"] = a / b if a is not None and b else None
    paired = [out["diff-tuning"]["convergence_step"][s] / out["plain"]["convergence_step"][s]
              for s in out["plain"]["convergence_step"]
              if out["plain"]["convergence_step"][s] and out["diff-tuning"]["convergence_step"].get(s) is not None]
    out["paired_ratios"] = paired
    return out


def plot(runs: list[dict], summary: dict, threshold: float, path: Path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"diff-tuning": "tab:red", "plain": "tab:blue"}
    for key, ax in zip(("condition_iou", "digit_agreement"), axes, strict=True):
        for m in METHODS:
            rs = [r for r in runs if r["method"] == m]
            for r in rs:
                ax.plot(r["steps"], r[key], color=colours[m], alpha=0.3, lw=1)
            mean = [statistics.mean(v) for v in zip(*[r[key] for r in rs], strict=True)]
            label = m if key != "condition_iou" else f"{m} (cross at {summary[m]['mean'] or float('nan'):.0f})"
            ax.plot(rs[0]["steps"], mean, color=colours[m], lw=2, label=label)
        level = threshold if key == "condition_iou" else summary.get("digit_threshold")
        if level is not None:
            ax.axhline(level, color="k", ls="--", lw=1, label=f"threshold {level}")
        ax.set_xlabel("training step")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend()
    ratio = summary["ratio_diff_tuning_over_plain"]
    fig.suptitle("ControlNet on builtin:digits-cond (edges): psi vs uniform timesteps"
                 + (f"; convergence ratio {ratio:.2f}" if ratio else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _same_settings(path: Path, s: dict) -> bool:
    """Whether ``path`` holds a finished run made with settings ``s`` (the seed count aside: more seeds reuse)."""
    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "seeds"}

    try:
        return strip(json.loads(path.read_text())["settings"]) == strip(s)
    except (OSError, ValueError, KeyError):
        return False


def main(argv=None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None, help="condition IoU that counts as converged")
    p.add_argument("--digit-threshold", type=float, default=None, help="digit agreement that counts as converged")
    p.add_argument("--condition", default="edges", choices=("edges", "silhouette"))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (separate processes, 1 thread each)")
    p.add_argument("--name", default="controlnet", help="stem of the result files")
    args = p.parse_args(argv)
    s = dict(QUICK if args.quick else FULL, condition=args.condition)
    for k in ("seeds", "steps", "lr", "threshold", "digit_threshold"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    out = C.out_dir(args)
    jobs = [(m, args.seed + i) for i in range(s["seeds"]) for m in METHODS]
    # one JSON per finished run (an interrupted benchmark resumes; more --seeds reuse), kept out of the results
    cache = (out / "tmp" if out.resolve() == C.RESULTS.resolve() else out) / f"{args.name}_runs"
    cache.mkdir(parents=True, exist_ok=True)

    def cached(m: str, seed: int) -> Path:
        return cache / f"{m}_s{seed}.json"

    todo = [(m, seed) for m, seed in jobs if not _same_settings(cached(m, seed), s)]
    t0 = time.time()
    if args.jobs > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(one_run, m, seed, s): (m, seed) for m, seed in todo}
            for f in as_completed(futures):
                C.write_json(cached(*futures[f]), {"settings": s, "run": f.result()})
    else:
        for m, seed in todo:
            C.write_json(cached(m, seed), {"settings": s, "run": one_run(m, seed, s)})
    runs = [json.loads(cached(m, seed).read_text())["run"] for m, seed in jobs]
    summary = summarise(runs, s["threshold"], s["digit_threshold"])
    summary["digit_threshold"] = s["digit_threshold"]
    result = {"benchmark": "controlnet", "settings": s, "metric": "first step where eval/condition_iou >= threshold "
              "(secondary: eval/digit_agreement >= digit_threshold)",
              "summary": summary, "runs": runs, "seconds": round(time.time() - t0, 1),
              "run_seconds_total": round(sum(r["seconds"] for r in runs), 1), "machine": C.machine()}
    C.write_json(out / f"{args.name}.json", result)
    plot(runs, summary, s["threshold"], out / f"{args.name}.png")
    for m in METHODS:
        r = summary[m]
        print(f"{m:12s} convergence step {r['convergence_step']} mean {r['mean']} (reached {r['reached']}); "
              f"final IoU {r['final_condition_iou']:.3f}, digit agreement {r['final_digit_agreement']:.2f}")
    print(f"ratio diff-tuning / plain: IoU {summary['ratio_diff_tuning_over_plain']}, digit agreement "
          f"{summary['digit_ratio_diff_tuning_over_plain']}; wrote {out / args.name}.json/.png")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
