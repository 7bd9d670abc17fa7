"""Equal memory: what each estimator can run within a memory budget, and what that costs in time (issue 23).

For a domain of ``which_estimator.py`` (its model, reward, batch and chain length) this measures, with the planner's
probe (:func:`chaintune.plan.memory.measure_peak`: a forked child's peak RSS above the loaded model on CPU, the
allocator's peak on CUDA), the peak memory of ONE gradient estimate of every candidate configuration, and its
seconds per sample (interleaved repetitions, so drifting load hits all alike):

* full backprop without checkpointing, and with gradient checkpointing at micro-batches of B, B/2, B/4, ...
  (the same gradient: the estimate averages over micro-batches, ``--grad-accum``);
* truncated backprop through the last K steps (AlignProp's family) for K = 1, 2, 3, 5, ...;
* RLR with h = 1, 2, 3, ... (FO + one span of h steps, 4 spans averaged, no ZO: align's estimator);
* DDPO and GRPO (one likelihood-ratio step at a time; they fit wherever RLR h = 1 does), DiffusionNFT and online
  DPO (as they are).

Two budgets: **tight** = RLR h = 2's peak (times ``--slack``), **loose** = full backprop's peak without
checkpointing. At each budget every method gets its best configuration that fits: full backprop the largest
micro-batch (checkpointed if it must be), truncated backprop the largest K, RLR the largest h (the paper's h*
rule with memory deciding), DDPO/GRPO/NFT/DPO as they are. With ``--ranking FILE`` (a ``which_estimator.py`` result on
the same domain) the table adds each configuration's measured quality: the runs whose estimate is the same gradient
(full backprop at any micro-batch or checkpointing; the same K, the same h), and the judge at equal wall-clock
using each configuration's own seconds per sample. Configurations without runs are listed with the command that
makes them.

    python benchmarks/budgets.py --domain image
    python benchmarks/budgets.py --domain video --ranking benchmarks/results/which_video.json
    python benchmarks/budgets.py --quick
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

try:
    from benchmarks import _common as C
    from benchmarks.which_estimator import DOMAINS, _interp
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]
    from which_estimator import DOMAINS, _interp  # type: ignore[no-redef]


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--domain", default="image", choices=list(DOMAINS))
    p.add_argument("--ks", default="1,2,3,5,10", help="truncated backprop: K values tried")
    p.add_argument("--hs", default="1,2,3,5", help="RLR: h values tried")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions per configuration (interleaved)")
    p.add_argument("--slack", type=float, default=1.05, help="tight budget = RLR h=2's peak times this")
    p.add_argument("--ranking", type=Path, action="append", default=[],
                   help="a which_estimator.py result JSON (same domain; repeat to merge rankings of other methods)")
    p.add_argument("--probe", type=Path, default=None,
                   help="an earlier budgets_DOMAIN.json: reuse its measured memory, times and picks, recompute quality")
    a = p.parse_args(argv)
    a.k_list = [int(x) for x in a.ks.split(",") if x]
    a.h_list = [int(x) for x in a.hs.split(",") if x]
    if a.quick:
        a.k_list, a.h_list, a.reps = [1, 2], [1, 2], 1
    return a


def candidates(args, steps: int, batch: int) -> list[dict]:
    """(label, method, estimator options, micro-batch) for every configuration tried."""
    out = [{"label": "full backprop", "method": "full backprop", "options": {"estimator": "full-backprop",
            "gradient_checkpointing": False}, "micro": batch}]
    m = batch
    while m >= 1:
        out.append({"label": f"full backprop ckpt micro {m}", "method": "full backprop",
                    "options": {"estimator": "full-backprop", "gradient_checkpointing": True}, "micro": m})
        m //= 2
    out += [{"label": f"truncated k={k}", "method": f"truncated k={k}", "micro": batch,
             "options": {"estimator": "truncated-backprop", "k": k}} for k in args.k_list if k <= steps]
    out += [{"label": f"rlr h={h}", "method": "rlr" if h == 1 else f"rlr h={h}", "micro": batch,
             "options": {"estimator": "rlr", "h": h}} for h in args.h_list if h < steps]
    out += [{"label": name, "method": name, "micro": batch, "options": {"estimator": est}}
            for name, est in AS_THEY_ARE.items()]
    return out


# the methods that run as they are at any budget (no setting trades memory): the likelihood-ratio baselines and the
# 2026 ones (DiffusionNFT and online DPO, issue 26)
AS_THEY_ARE = {"ddpo": "reinforce", "grpo": "grpo", "nft": "nft", "dpo": "dpo"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    import torch

    import chaintune
    from chaintune.align import AlignConfig, estimator_from_config
    from chaintune.diagnostics import grouped_conditions

    t_start = time.time()
    if args.probe is not None:
        return requality(args, t_start)
    dom = dict(DOMAINS[args.domain]["align"])
    if args.quick:
        dom.update(batch_size=4, sample_steps=4)
    steps, batch = dom["sample_steps"], dom["batch_size"]
    model = chaintune.load(dom["model"], device="cpu")
    model.denoiser.requires_grad_(True)
    cands = candidates(args, steps, batch)
    for c in cands:
        cfg = AlignConfig.from_dict({"model": dom["model"], "reward": dom["reward"], "sample_steps": steps,
                                     **c["options"]})
        c["estimator"] = estimator_from_config(cfg)
        c["checkpoint"] = c["options"].get("gradient_checkpointing", True)

    def estimate(c: dict, seed: int = 0) -> None:
        kw = {}
        if model.takes_prompts:
            kw["prompts"] = grouped_conditions(model, max(1, c["micro"] // 4), min(4, c["micro"]),
                                               torch.Generator().manual_seed(seed)).prompts[: c["micro"]]
        chaintune.estimate_gradient(model, dom["reward"], c["estimator"], c["micro"], steps=steps,
                                    checkpoint=c["checkpoint"], generator=torch.Generator().manual_seed(seed), **kw)

    for c in cands:  # memory: one estimate in a fresh forked child each
        res = C.measure_in_child(lambda c=c: estimate(c) or {})
        c["peak_mib"] = res.get("peak_mib", float("nan"))
        C.log(f"  [{args.domain}] {c['label']:28s} peak {c['peak_mib']:8.1f} MiB")
    times: dict[str, list[float]] = {c["label"]: [] for c in cands}
    for r in range(args.reps):  # time: interleaved, seconds per sample of the whole batch (micro-batches summed)
        for c in (cands if r % 2 == 0 else cands[::-1]):
            t0 = time.perf_counter()
            for i in range(batch // c["micro"]):
                estimate(c, seed=r * 1000 + i)
            times[c["label"]].append((time.perf_counter() - t0) / batch)
    for c in cands:
        c["sec_per_sample"] = statistics.median(times[c["label"]])
        del c["estimator"]
    rlr2 = next((c for c in cands if c["label"] == "rlr h=2"), None)
    fb = cands[0]
    budgets = {"tight": (rlr2["peak_mib"] if rlr2 else float("nan")) * args.slack, "loose": fb["peak_mib"] * 1.001}
    picks = {b: pick(cands, limit) for b, limit in budgets.items()}
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "ranking")},
              "domain": {"name": args.domain, **dom}, "machine": C.machine(), "candidates": cands,
              "budgets_mib": budgets, "picks": picks}
    if args.ranking:
        result["quality"] = quality(merged_ranking(args.ranking), picks, batch)
    return _write(args, result, t_start)


def requality(args, t_start: float) -> dict:
    """``--probe``: the earlier run's measurements and picks, quality from the given rankings."""
    result = json.loads(args.probe.read_text())
    result["config"].update(ranking=[str(p) for p in args.ranking], probe=str(args.probe))
    if args.ranking:
        result["quality"] = quality(merged_ranking(args.ranking), result["picks"], result["domain"]["batch_size"])
    return _write(args, result, t_start)


def merged_ranking(paths: list[Path]) -> dict:
    """Rankings of one domain (and protocol) run at different times: their runs and chosen LRs together."""
    rankings = [json.loads(p.read_text()) for p in paths]
    base = dict(rankings[0])
    runs = {(r["method"], r["lr"], r["seed"], r["stage"], r["steps"]): r for k in rankings for r in k["runs"]}
    base["runs"] = list(runs.values())  # a ranking that reused another's runs holds copies of them
    base["chosen_lr"] = {m: lr for k in rankings for m, lr in k["chosen_lr"].items()}
    for k in rankings[1:]:
        if (k["domain"]["name"], k["domain"]["steps"]) != (base["domain"]["name"], base["domain"]["steps"]):
            raise SystemExit(f"error: rankings of different domains or budgets: {paths}")
    return base


def _write(args, result: dict, t_start: float) -> dict:
    result["seconds"] = round(time.time() - t_start, 1)
    out = C.out_dir(args)
    C.write_json(out / f"budgets_{args.domain}.json" if not args.quick else out / "budgets.json", result)
    plot(result, out / (f"budgets_{args.domain}.png" if not args.quick else "budgets.png"))
    print_tables(result)
    return result


def pick(cands: list[dict], limit: float) -> dict[str, dict]:
    """Per method family, the best configuration within ``limit`` MiB: full backprop's largest micro-batch (no
    checkpointing first), truncated backprop's largest K, RLR's largest h; DDPO and GRPO if they fit."""
    fits = [c for c in cands if c["peak_mib"] == c["peak_mib"] and c["peak_mib"] <= limit]
    out: dict[str, dict] = {}
    fb = [c for c in fits if c["method"] == "full backprop"]
    if fb:
        out["full backprop"] = max(fb, key=lambda c: (c["micro"], not c["checkpoint"]))
    tr = [c for c in fits if c["label"].startswith("truncated")]
    if tr:
        out["truncated backprop"] = max(tr, key=lambda c: c["options"]["k"])
    rl = [c for c in fits if c["label"].startswith("rlr")]
    if rl:
        out["rlr"] = max(rl, key=lambda c: c["options"]["h"])
    for c in fits:
        if c["label"] in AS_THEY_ARE:
            out[c["label"]] = c
    return out


def quality(ranking: dict, picks: dict[str, dict], batch: int) -> list[dict]:
    """Each pick's judge from the ranking's reported runs of the same gradient, at equal samples (the kept model)
    and at equal wall-clock: every run's curve re-timed with the pick's own seconds per sample, then read at the time
    the fastest pick of that budget needs for the whole budget of samples."""
    try:
        from benchmarks.which_estimator import _delivered
    except ImportError:
        from which_estimator import _delivered  # type: ignore[no-redef]

    judge = ranking["domain"]["judge"]
    chosen = ranking["chosen_lr"]
    full = ranking["domain"]["steps"]
    rows = []
    for budget, ps in picks.items():
        total = full * batch
        t_common = min(p["sec_per_sample"] * total for p in ps.values())
        for family, p in ps.items():
            method = p["method"]
            runs = [r for r in ranking["runs"] if r["method"] == method and r["lr"] == chosen.get(method)
                    and r["steps"] == full and r["stage"] == "report" and r.get("evals")]
            row = {"budget": budget, "family": family, "config": p["label"], "peak_mib": p["peak_mib"],
                   "sec_per_sample": p["sec_per_sample"], "seeds": len(runs), "method": method}
            if runs:
                kept = [_delivered(r).get(judge, float("nan")) for r in runs]
                retimed = [{"evals": [{**e, "train_seconds": e["samples"] * p["sec_per_sample"]} for e in r["evals"]]}
                           for r in runs]
                at_t = [_interp(r, t_common, judge) for r in retimed]
                row.update(kept=statistics.mean(kept), kept_std=statistics.stdev(kept) if len(kept) > 1 else
                           float("nan"), at_time=statistics.mean(at_t), common_seconds=t_common)
            else:
                row["missing"] = (f"python benchmarks/which_estimator.py --domain {ranking['domain']['name']} "
                                  f"--methods '{method}' --reuse PARTIAL")
            rows.append(row)
    return rows


def print_tables(result: dict) -> None:
    print()
    print(C.table(result["candidates"], [("label", "configuration", "s"), ("micro", "micro-batch", "d"),
                                         ("peak_mib", "peak MiB", ".1f"), ("sec_per_sample", "s/sample", ".3f")],
                  title=f"{result['domain']['name']}: one estimate of batch {result['domain']['batch_size']}, "
                        f"T = {result['domain']['sample_steps']}"))
    for b, limit in result["budgets_mib"].items():
        picks = result["picks"][b]
        print(f"\n{b} budget {limit:.1f} MiB: " + "; ".join(f"{k}: {v['label']}" for k, v in picks.items()))
    if result.get("quality"):
        print()
        print(C.table(result["quality"], [("budget", "budget", "s"), ("config", "configuration", "s"),
                                          ("peak_mib", "MiB", ".0f"), ("sec_per_sample", "s/sample", ".3f"),
                                          ("seeds", "seeds", "d"), ("kept", "judge (samples)", ".3f"),
                                          ("kept_std", "±std", ".3f"), ("at_time", "judge (equal time)", ".3f")],
                      title="equal memory: quality of each budget's configurations"))
        for r in result["quality"]:
            if "missing" in r:
                print(f"  no runs of {r['config']}: {r['missing']}")
    print(f"\ntotal {result['seconds']:.0f}s")


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in result["candidates"]:
        ax.scatter(c["peak_mib"], c["sec_per_sample"], s=18)
        ax.annotate(c["label"], (c["peak_mib"], c["sec_per_sample"]), fontsize=6)
    for b, limit in result["budgets_mib"].items():
        if limit == limit:
            ax.axvline(limit, ls=":", color="k", lw=1)
            ax.text(limit, ax.get_ylim()[1], b, fontsize=7, rotation=90, va="top")
    ax.set(xscale="log", xlabel="peak MiB of one estimate", ylabel="seconds per sample",
           title=f"{result['domain']['name']}: memory vs time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
