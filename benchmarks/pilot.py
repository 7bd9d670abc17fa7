"""Does ``chaintune align --pilot`` choose well, and what does it cost?

For each target the pilot probes ``--lrs`` (RLR, everything else at ``chaintune align``'s defaults) for a fifth of
the run's steps, and picks the probe with the best held-out reward that raised no hacking alarm. Against it, the
full run at *every* LR of the grid (seed 0, the defaults' 250 steps), judged on its final held-out evaluation:

* ``chosen``: the full run at the pilot's LR; ``best``: the best full run of the grid (what an oracle would pick);
  ``default``: the full run at the default LR (1e-4, what a user without the pilot gets);
* ``regret``: best - chosen (0: the pilot picked the best LR); ``cost``: the pilot's seconds over one full run's.

Targets: digit:2 and digit:6 on builtin:digits (two digits the defaults were not tuned on). The held-out judge
is the family's twin (digit-heldout:K, a classifier training never saw); ``class_share`` is the share of samples
it labels K.

    python benchmarks/pilot.py            # ~45 min on 2 busy CPU cores (--jobs 2)
    python benchmarks/pilot.py --quick    # CI smoke
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

FULL = dict(targets=["digit:2", "digit:6"], lrs=[3e-5, 1e-4, 3e-4], steps=250, default_lr=1e-4,
            overrides={})
QUICK = dict(targets=["digit:2"], lrs=[1e-4, 3e-4], steps=4, default_lr=1e-4,
             overrides={"batch_size": 4, "sample_steps": 4, "eval_samples": 8, "eval_every": 2})
FAST = {"tensorboard": False, "report": False, "progress": False, "save_every": 0, "device": "cpu", "seed": 0}


def _cfg(target: str, s: dict, **over):
    from chaintune.align.config import AlignConfig

    return AlignConfig.from_dict({"reward": target, "estimator": "rlr", "steps": s["steps"], **s["overrides"], **FAST,
                                  **over})


def _fit(c) -> tuple[dict, dict, list[str]]:
    from chaintune.align.objective import AlignObjective
    from chaintune.run.trainer import Trainer

    obj = AlignObjective(c)
    trainer = Trainer(c, obj, out=None, show_progress=False, thread_policy=False)
    res = trainer.fit()
    return res.final, res.first_eval, [e["reason"] for e in trainer.state.get(obj.alarm_policy.name, [])]


def pilot(target: str, s: dict) -> dict:
    C.setup_threads(1)
    from chaintune.align.objective import align_pilot

    t0 = time.time()
    full, record = align_pilot(_cfg(target, s, pilot=True, pilot_lrs=",".join(map(str, s["lrs"]))),
                               thread_policy=False, log=lambda line: None)
    return {"target": target, "kind": "pilot", "chosen_lr": full.optim.lr, "probes": record["probes"],
            "seconds": round(time.time() - t0, 1)}


def full_run(target: str, lr: float, s: dict) -> dict:
    C.setup_threads(1)
    t0 = time.time()
    final, first, alarms = _fit(_cfg(target, s, lr=lr))
    return {"target": target, "kind": "full", "lr": lr, "heldout": final.get("eval/heldout_reward"),
            "class_share": final.get("eval/class_share"), "start_share": first.get("eval/class_share"),
            "alarms": alarms, "seconds": round(time.time() - t0, 1)}


def summarise(results: list[dict], s: dict) -> list[dict]:
    rows = []
    for t in s["targets"]:
        p = next(r for r in results if r["target"] == t and r["kind"] == "pilot")
        runs = {r["lr"]: r for r in results if r["target"] == t and r["kind"] == "full"}
        best = max(runs.values(), key=lambda r: r["heldout"])
        chosen, default = runs[p["chosen_lr"]], runs[s["default_lr"]]
        full_seconds = sum(r["seconds"] for r in runs.values()) / len(runs)
        rows.append({"target": t, "chosen_lr": p["chosen_lr"], "best_lr": best["lr"],
                     "chosen_share": chosen["class_share"], "best_share": best["class_share"],
                     "default_share": default["class_share"], "start_share": chosen["start_share"],
                     "chosen_heldout": chosen["heldout"], "best_heldout": best["heldout"],
                     "regret_heldout": best["heldout"] - chosen["heldout"],
                     "pilot_seconds": p["seconds"], "full_seconds": full_seconds,
                     "cost": p["seconds"] / full_seconds})
    return rows


def plot(rows: list[dict], path) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(rows))
    for k, (key, label) in enumerate((("start_share", "base"), ("default_share", "default LR"),
                                      ("chosen_share", "pilot's LR"), ("best_share", "best LR of the grid"))):
        ax.bar([i + 0.2 * k for i in x], [r[key] for r in rows], 0.2, label=label)
    ax.set_xticks([i + 0.3 for i in x], [r["target"] for r in rows])
    ax.set_ylabel("held-out class share (final)")
    ax.set_title("align --pilot: the LR it picks vs the grid's best")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--name", default="pilot")
    args = p.parse_args(argv)
    s = dict(QUICK if args.quick else FULL)
    out = C.out_dir(args)
    jobs = [(pilot, t, s) for t in s["targets"]] + [(full_run, t, lr, s) for t in s["targets"] for lr in s["lrs"]]
    t0 = time.time()
    results: list = [None] * len(jobs)
    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(fn, *a): i for i, (fn, *a) in enumerate(jobs)}
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                C.log(f"  done {sum(r is not None for r in results)}/{len(jobs)}")
    else:
        results = [fn(*a) for fn, *a in jobs]
    rows = summarise(results, s)
    result = {"benchmark": "pilot", "settings": s, "rows": rows, "runs": results, "seconds": round(time.time() - t0, 1),
              "machine": C.machine()}
    C.write_json(out / f"{args.name}.json", result)
    plot(rows, out / f"{args.name}.png")
    cols = [("target", "target", ""), ("chosen_lr", "pilot LR", ".3g"), ("best_lr", "best LR", ".3g"),
            ("start_share", "base", ".3f"), ("default_share", "default LR", ".3f"),
            ("chosen_share", "pilot's", ".3f"), ("best_share", "best", ".3f"),
            ("regret_heldout", "regret (held-out)", ".3f"), ("cost", "pilot / full run", ".2f")]
    print(C.table(rows, cols, title="align --pilot against the full grid (final held-out evaluation)"))
    print(f"wrote {out / args.name}.json/.png ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
