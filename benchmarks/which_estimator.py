"""Which estimator when: rankings per target at equal samples, equal wall-clock and equal memory (issue 23).

Each **domain** is a model, a reward and a budget of samples; each **method** an estimator with ``chaintune align``'s
defaults for everything it does not name (KL guard 0.01, the hacking guard with rollback, the kept best evaluation
as the model, cosine LR, the per-prompt baseline over prompts drawn in groups of 4):

=================  ============================================================================================
``image``          builtin:digits, ``digit:5``, 20-step DDIM chain, 150 steps x 32 = 4,800 samples; judge: the
                   held-out classifier's share of 5s (``eval/class_share``)
``image-blackbox`` the same with ``digit-blackbox:5`` (the classifier on the 8-bit image, no gradient)
``video``          builtin:moving-digits, ``moving-digit`` (prompt fidelity), 10-step flow chain, 150 x 32 = 4,800
                   clips; judge: ``eval/follows_prompt`` (the held-out video judge: the prompt's digit, read by an
                   MLP training never saw, moving the prompt's way)
``video-smooth``   builtin:moving-digits, ``smoothness`` (steady motion; decided at the data end of the chain);
                   judge: ``eval/heldout_reward`` (cross-correlation track, a measurement training never saw)
=================  ============================================================================================

Protocol (docs/results.md, "Which estimator when"): **stage 1** runs every method at each LR of ``--lrs`` on
``--select-seed`` (3: a seed that is not reported) for ``--select-fraction`` of the budget and keeps the LR whose
run ends with the best judge among runs whose realism distance stays within the hacking guard's tolerance of the
base model's; **stage 2** runs ``--seeds`` (0, 1, 2) at that LR on the whole budget. Reported per method: the judge
of the model each run delivers (the best evaluation the guard kept) and of its last evaluation, mean and standard
deviation over seeds; the judge at equal wall-clock (each run's curve read at the time the fastest method needs
for the whole budget, on the training loop's own clock, from runs that shared the machine's load: ``--workers``
concurrent processes of one thread each); and the peak memory of one gradient estimate
(:func:`chaintune.plan.memory.measure_peak`). ``--budgets`` adds the equal-memory comparison (see
``budgets.py``'s configurations).

Runs append to ``--partial`` as they finish; ``--reuse FILE`` takes finished runs (same domain, method, LR, seed
and budget) instead of running them again, so an interrupted ranking continues where it stopped.

    python benchmarks/which_estimator.py --domain video --workers 2 --partial /tmp/video.partial.json
    python benchmarks/which_estimator.py --domain image --methods rlr,ddpo --reuse /tmp/image.partial.json
    python benchmarks/which_estimator.py --quick     # CI smoke (< 90 s)
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import _common as C
    from benchmarks.alignment import _delivered, _interp, step_seconds
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]
    from alignment import _delivered, _interp, step_seconds  # type: ignore[no-redef]

DOMAINS: dict[str, dict] = {
    "image": {"align": dict(model="builtin:digits", reward="digit:5", sample_steps=20, batch_size=32, steps=150,
                            eval_every=25, eval_samples=64), "judge": "eval/class_share",
              "realism": "eval/nn_distance"},
    "image-blackbox": {"align": dict(model="builtin:digits", reward="digit-blackbox:5", sample_steps=20,
                                     batch_size=32, steps=150, eval_every=25, eval_samples=64),
                       "judge": "eval/class_share", "realism": "eval/nn_distance"},
    "video": {"align": dict(model="builtin:moving-digits", reward="moving-digit", sample_steps=10, batch_size=32,
                            steps=150, eval_every=25, eval_samples=32), "judge": "eval/follows_prompt",
              "realism": "eval/nn_distance"},
    "video-smooth": {"align": dict(model="builtin:moving-digits", reward="smoothness", sample_steps=10, batch_size=32,
                                   steps=150, eval_every=25, eval_samples=32), "judge": "eval/heldout_reward",
                     "realism": "eval/nn_distance"},
}

# estimator options only; everything else is the domain's or AlignConfig's default
METHODS: dict[str, dict] = {
    "rlr": {"estimator": "rlr"},
    # the best of 7 RLR settings on video by gradient quality (chaintune.diagnostics.gradient_quality: the mean cosine
    # of one estimate with full backprop's gradient, 16 + 24 estimates, seeds 100 and 200): 3-step spans kept where
    # the reward is decided (decision profile: paper steps 6-9 of 10) averaged 0.048 against the default's 0.033;
    # every setting's estimates were noise-dominated (SNR < 0.01), so the ranking decides
    "rlr tuned": {"estimator": "rlr", "h": 3, "j": "6,9"},
    # the span range chaintune recommends for the late-decided target: decision_profile of `smoothness` on
    # builtin:moving-digits (T = 10, 32 samples, seed 0) puts its effect in paper steps 2-3 (0.53, 0.61 against
    # <= 0.21 elsewhere), and DecisionProfile.span_range(1) picks j = 2,3
    "rlr late": {"estimator": "rlr", "j": "2,3"},
    "ddpo": {"estimator": "reinforce"},
    "grpo": {"estimator": "grpo"},
    "alignprop k=1": {"estimator": "alignprop", "k": 1},
    "full backprop": {"estimator": "full-backprop"},
    "zeroth-order": {"estimator": "zeroth-order"},
    # the 2026 baselines at their references' defaults (estimators/options.py: nft_beta 1, dpo_beta 2000, every
    # chain timestep trained)
    "nft": {"estimator": "nft"},
    "dpo": {"estimator": "dpo"},
}
def method_options(label: str) -> dict | None:
    """A method's estimator options: METHODS, or the families budgets.py picks from: ``rlr h=H``, ``truncated k=K``."""
    if label in METHODS:
        return METHODS[label]
    m = re.fullmatch(r"rlr h=(\d+)", label)
    if m:
        return {"estimator": "rlr", "h": int(m.group(1))}
    m = re.fullmatch(r"truncated k=(\d+)", label)
    if m:
        return {"estimator": "truncated-backprop", "k": int(m.group(1))}
    return None


DEFAULT_METHODS = {
    "image": ["rlr", "ddpo", "grpo", "alignprop k=1", "full backprop", "nft", "dpo"],
    "image-blackbox": ["rlr", "ddpo", "grpo", "zeroth-order", "nft", "dpo"],
    "video": ["rlr", "rlr tuned", "ddpo", "grpo", "alignprop k=1", "full backprop", "nft", "dpo"],
    "video-smooth": ["rlr", "rlr late", "ddpo", "alignprop k=1", "full backprop"],
}
_COST = {"full backprop": 3, "ddpo": 2.5, "grpo": 2.5, "nft": 2.5, "dpo": 3, "rlr tuned": 2, "rlr late": 1.5,
         "zeroth-order": 1.5}


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--domain", default="image", choices=list(DOMAINS))
    p.add_argument("--methods", default=None, help="comma list of method labels (default: the domain's)")
    p.add_argument("--lrs", default="1e-4,3e-4", help="stage 1: LRs to choose from")
    p.add_argument("--select-seed", type=int, default=3, help="stage 1: the LR-selection seed (not reported)")
    p.add_argument("--select-fraction", type=float, default=1 / 3, help="stage 1: share of the budget")
    p.add_argument("--seeds", default="0,1,2", help="stage 2: reported seeds")
    p.add_argument("--chosen-lrs", default="{}", help='JSON {"method": lr}: skip stage 1 for these')
    p.add_argument("--workers", type=int, default=2, help="parallel run processes (one torch thread each)")
    p.add_argument("--partial", type=Path, default=None, help="append finished runs here (JSON list)")
    p.add_argument("--reuse", type=Path, action="append", default=[], help="a --partial file of earlier runs")
    p.add_argument("--reuse-ranking", type=Path, action="append", default=[],
                   help="a result of `alignment.py --ranking` on this domain's settings: its runs are taken too")
    p.add_argument("--steps", type=int, default=None, help="override the domain's optimizer steps")
    p.add_argument("--name", default=None, help="result file stem (default which_DOMAIN)")
    p.add_argument("--memory", action="store_true", help="also measure one estimate's peak memory per method")
    a = p.parse_args(argv)
    a.method_list = [m for m in (a.methods or ",".join(DEFAULT_METHODS[a.domain])).split(",") if m]
    bad = [m for m in a.method_list if method_options(m) is None]
    if bad:
        p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    a.lr_list = [float(x) for x in a.lrs.split(",") if x]
    a.seed_list = [int(x) for x in a.seeds.split(",") if x]
    a.chosen = {m: float(v) for m, v in json.loads(a.chosen_lrs).items() if m in a.method_list}
    a.overrides = {}
    if a.quick:
        a.overrides = dict(steps=3, batch_size=4, sample_steps=4, eval_every=3, eval_samples=4)
        a.method_list = [m for m in a.method_list if m in ("rlr", "ddpo")] or a.method_list[:1]
        a.lr_list, a.seed_list, a.select_fraction = a.lr_list[:1], [0], 1.0
    if a.steps:
        a.overrides["steps"] = a.steps
    a.name = a.name or f"which_{a.domain}"
    return a


def domain_options(args) -> dict:
    return {**DOMAINS[args.domain]["align"], **args.overrides}


def run_config(args, method: str, lr: float, seed: int, steps: int, out: Path):
    from chaintune.align import AlignConfig

    opts = dict(domain_options(args), steps=steps, lr=lr, seed=seed, out=str(out), save_every=0, tensorboard=False,
                progress=False, report=False, device="cpu")
    opts.update(method_options(method))
    return AlignConfig.from_dict(opts)


def _run(job: tuple) -> dict:
    """One alignment run in a worker process: its evaluations on the training loop's clock."""
    args, method, lr, seed, steps, stage, out = job
    C.setup_threads(1)
    from chaintune.align import align_run

    cfg = run_config(args, method, lr, seed, steps, Path(out))
    t0 = time.time()
    try:
        res = align_run(cfg, overwrite=True, thread_policy=False)
    except Exception as e:  # noqa: BLE001 - a failed run is reported, not fatal
        return {"domain": args.domain, "method": method, "lr": lr, "seed": seed, "steps": steps, "stage": stage,
                "error": f"{type(e).__name__}: {e}"}
    metrics = res.history
    med, clock = step_seconds(metrics)
    evals = []
    for m in metrics:
        if any(k.startswith("eval/") for k in m):
            e = {k: v for k, v in m.items() if k.startswith("eval/") or k == "step"}
            e["samples"] = e["step"] * cfg.optim.batch_size * cfg.optim.grad_accum
            e["train_seconds"] = clock[min(e["step"], len(clock) - 1)]
            evals.append(e)
    info = json.loads((Path(out) / "chaintune_run.json").read_text())
    return {"domain": args.domain, "method": method, "lr": lr, "seed": seed, "steps": steps, "stage": stage,
            "evals": evals, "sec_per_step": med, "wall_seconds": time.time() - t0,
            "guard_events": info.get("hacking", []), "final_model": info.get("final_model"),
            "config": dict(method_options(method))}


# `alignment.py --ranking` labels of the same estimator configurations (their options beyond the estimator's own are
# AlignConfig's defaults there too)
LEGACY_LABELS = {"rlr h=1": "rlr", "ddpo (reinforce)": "ddpo", "grpo (batch group)": "grpo",
                 "full-backprop": "full backprop", "alignprop k=1": "alignprop k=1", "rlr h=2": "rlr h=2",
                 "zeroth-order": "zeroth-order"}


def legacy_runs(path: Path, args) -> list[dict]:
    """The runs of an `alignment.py --ranking` result as this script's runs (same settings checked: reward, steps,
    batch, chain length)."""
    data = json.loads(path.read_text())
    cfg, dom = data["config"], domain_options(args)
    pairs = (("reward", "reward"), ("batch", "batch_size"), ("sample_steps", "sample_steps"),
             ("eval_every", "eval_every"), ("eval_samples", "eval_samples"))
    same = all(cfg[a] == dom[b] for a, b in pairs)
    if not same:
        raise SystemExit(f"{path}: not this domain's settings ({cfg['reward']}, batch {cfg['batch']}, T "
                         f"{cfg['sample_steps']})")
    out = []
    for r in [*data.get("stage1", []), *data.get("stage2", [])]:
        if r.get("evals") and r["method"] in LEGACY_LABELS:
            out.append({**r, "domain": args.domain, "method": LEGACY_LABELS[r["method"]], "steps": cfg["steps"],
                        "stage": "report" if r["seed"] in args.seed_list else "select", "from": str(path)})
    return out


def _key(r: dict) -> tuple:
    return r["domain"], r["method"], r["lr"], r["seed"], r["steps"]


def run_jobs(args, jobs: list[tuple]) -> list[dict]:
    import multiprocessing as mp

    done = {_key(r): r for f in args.reuse_ranking for r in legacy_runs(f, args)}
    for f in args.reuse:
        if f.exists():
            for r in json.loads(f.read_text()):
                if r.get("evals"):
                    done[_key(r)] = r
    reused = [done[(args.domain, *j[1:5])] for j in jobs if (args.domain, *j[1:5]) in done]
    todo = [j for j in jobs if (args.domain, *j[1:5]) not in done]
    C.log(f"  {len(reused)} runs reused, {len(todo)} to run")
    out = list(reused)
    finished = list(done.values())
    # spawn, not fork: a worker forked from this process (torch's threads running) can deadlock on a lock
    pool = mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) if args.workers > 1 and todo else None
    judge = DOMAINS[args.domain]["judge"]
    with pool or contextlib.nullcontext():
        for r in (pool.imap_unordered(_run, todo) if pool else map(_run, todo)):
            C.log(f"  [{args.domain}] {r['method']:24s} lr {r['lr']:g} seed {r['seed']} ({r['stage']}): "
                  + (r["error"] if "error" in r else _summary(r, judge)))
            out.append(r)
            finished.append(r)
            if args.partial:
                C.write_json(args.partial, finished)
    return out


def _summary(r: dict, judge: str) -> str:
    nan = float("nan")
    return (f"{judge} {r['evals'][0].get(judge, nan):.3f} -> kept {_delivered(r).get(judge, nan):.3f}, last "
            f"{r['evals'][-1].get(judge, nan):.3f}  {r['sec_per_step']:.1f} s/step  {r['wall_seconds']:.0f}s")


def choose_lr(args, stage1: list[dict]) -> dict[str, float]:
    """Per method: the LR whose stage-1 run ends with the best judge among those whose realism distance stays within
    the hacking guard's tolerance of the base model's (else the least unrealistic)."""
    from chaintune.align.config import GuardConfig

    judge, realism = DOMAINS[args.domain]["judge"], DOMAINS[args.domain]["realism"]
    tol = GuardConfig().realism_tolerance
    chosen = dict(args.chosen)
    for m in args.method_list:
        if m in chosen:
            continue
        cands = [r for r in stage1 if r["method"] == m and r.get("evals")]
        if not cands:
            continue
        base = cands[0]["evals"][0].get(realism, float("nan"))
        real = [r for r in cands if _delivered(r).get(realism, float("inf")) <= tol * base]
        pick = (max(real, key=lambda r: (_delivered(r).get(judge, float("-inf")), r["evals"][-1].get(judge, 0)))
                if real else min(cands, key=lambda r: _delivered(r).get(realism, float("inf"))))
        chosen[m] = pick["lr"]
    return chosen


def _ms(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    return (statistics.mean(xs) if xs else float("nan"), statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(args, runs: list[dict], chosen: dict[str, float]) -> list[dict]:
    judge, realism = DOMAINS[args.domain]["judge"], DOMAINS[args.domain]["realism"]
    full = domain_options(args)["steps"]
    final = {m: [r for r in runs if r["method"] == m and r["lr"] == chosen.get(m) and r["steps"] == full
                 and r["seed"] in args.seed_list and r.get("evals")] for m in args.method_list}
    ends = [r["evals"][-1]["train_seconds"] for rs in final.values() for r in rs]
    t_common = min(ends) if ends else float("nan")  # the fastest run's whole budget
    bases = [r["evals"][0] for rs in final.values() for r in rs]
    base_judge = _ms([b.get(judge, float("nan")) for b in bases])[0]
    base_real = _ms([b.get(realism, float("nan")) for b in bases])[0]
    rows = []
    for m, rs in final.items():
        kept = [_delivered(r) for r in rs]
        rows.append({
            "method": m, "lr": chosen.get(m), "seeds": len(rs),
            "kept": _ms([e.get(judge, float("nan")) for e in kept])[0],
            "kept_std": _ms([e.get(judge, float("nan")) for e in kept])[1],
            "per_seed_kept": [e.get(judge) for e in kept],
            "last": _ms([r["evals"][-1].get(judge, float("nan")) for r in rs])[0],
            "heldout_kept": _ms([e.get("eval/heldout_reward", float("nan")) for e in kept])[0],
            "realism_kept": _ms([e.get(realism, float("nan")) / base_real for e in kept])[0],
            "at_common_time": _ms([_interp(r, t_common, judge) for r in rs])[0],
            "sec_per_step": statistics.median(r["sec_per_step"] for r in rs) if rs else float("nan"),
            "rollbacks": sum(1 for r in rs for e in r.get("guard_events", []) if "rolled back" in e.get("action", "")),
        })
    rows.sort(key=lambda r: -r["kept"] if r["kept"] == r["kept"] else 1.0)
    for r in rows:
        r["base"] = base_judge
        r["common_seconds"] = t_common
    return rows


def measure_memory(args) -> dict[str, float]:
    """Peak memory (MiB) of one gradient estimate of each method at the domain's batch and chain length."""
    import torch

    import chaintune
    from chaintune.align import estimator_from_config
    from chaintune.diagnostics import grouped_conditions

    opts = domain_options(args)
    model = chaintune.load(opts["model"], device="cpu")
    model.denoiser.requires_grad_(True)
    out = {}
    for m in args.method_list:
        cfg = run_config(args, m, 1e-4, 0, 1, Path(tempfile.gettempdir()) / "unused")
        est = estimator_from_config(cfg)
        kw = {}
        if model.takes_prompts:
            groups = grouped_conditions(model, opts["batch_size"] // 4, 4, torch.Generator().manual_seed(0))
            kw["prompts"] = groups.prompts

        def work(est=est, kw=kw) -> dict:
            chaintune.estimate_gradient(model, opts["reward"], est, opts["batch_size"], steps=opts["sample_steps"],
                                        generator=torch.Generator().manual_seed(0), **kw)
            return {}

        res = C.measure_in_child(work)
        out[m] = res.get("peak_mib", float("nan"))
        C.log(f"  [{args.domain}] memory {m:24s} {out[m]:.0f} MiB")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    full = domain_options(args)["steps"]
    short = max(1, round(full * args.select_fraction))
    with tempfile.TemporaryDirectory(prefix="chaintune-which-") as tmp:
        def job(m, lr, seed, steps, stage):
            return (args, m, lr, seed, steps, stage, str(Path(tmp) / f"{m.replace(' ', '_')}-{lr:g}-{seed}-{steps}"))

        select = [m for m in args.method_list if m not in args.chosen]
        C.log(f"[{args.domain}] stage 1: {len(select)} methods x LRs {args.lr_list} on seed {args.select_seed}, "
              f"{short} steps")
        stage1 = run_jobs(args, sorted([job(m, lr, args.select_seed, short, "select") for m in select
                                        for lr in args.lr_list], key=lambda j: -_COST.get(j[1], 1)))
        chosen = choose_lr(args, stage1)
        C.log(f"[{args.domain}] chosen LRs: {chosen}")
        stage2 = run_jobs(args, sorted([job(m, chosen[m], s, full, "report") for m in chosen for s in args.seed_list],
                                       key=lambda j: -_COST.get(j[1], 1)))
    runs = stage1 + stage2
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "reuse", "partial", "reuse_ranking")},
              "domain": {"name": args.domain, **domain_options(args), "judge": DOMAINS[args.domain]["judge"]},
              "machine": C.machine(), "chosen_lr": chosen, "table": summarize(args, runs, chosen), "runs": runs,
              "failed": [r for r in runs if "error" in r]}
    if args.memory:
        mem = measure_memory(args)
        for row in result["table"]:
            row["peak_mib"] = mem.get(row["method"])
    result["seconds"] = round(time.time() - t_start, 1)
    out = C.out_dir(args)
    C.write_json(out / f"{args.name}.json", result)
    plot(result, out / f"{args.name}.png")
    print_table(result)
    return result


def print_table(result: dict) -> None:
    d = result["domain"]
    rows = result["table"]
    t = rows[0]["common_seconds"] if rows else float("nan")
    cols = [("method", "method", "s"), ("lr", "LR", "g"), ("seeds", "seeds", "d"), ("kept", "kept", ".3f"),
            ("kept_std", "±std", ".3f"), ("last", "last", ".3f"), ("heldout_kept", "held-out", ".3f"),
            ("realism_kept", "realism/base", ".2f"), ("at_common_time", f"@{t:.0f}s", ".3f"),
            ("sec_per_step", "s/step", ".1f"), ("peak_mib", "peak MiB", ".0f"), ("rollbacks", "rollbacks", "d")]
    print()
    print(C.table(rows, cols, title=(
        f"{d['name']}: {d['model']} / {d['reward']}, {d['steps']} steps x {d['batch_size']}, T = {d['sample_steps']}; "
        f"judge {d['judge']} (base {rows[0]['base'] if rows else float('nan'):.3f}); kept = the delivered model")))
    if result["failed"]:
        print("failed:", [(r["method"], r["lr"], r["seed"], r["error"]) for r in result["failed"]])
    print(f"\ntotal {result['seconds']:.0f}s")


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    judge = result["domain"]["judge"]
    chosen = result["chosen_lr"]
    full = result["domain"]["steps"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    for i, m in enumerate(methods):
        rs = [r for r in result["runs"] if r["method"] == m and r["lr"] == chosen.get(m) and r["steps"] == full
              and r.get("evals")]
        for j, r in enumerate(rs):
            e = r["evals"]
            kw = dict(color=colors[i % len(colors)], alpha=0.7, label=m if j == 0 else None)
            axes[0].plot([x["samples"] for x in e], [x.get(judge, float("nan")) for x in e], **kw)
            axes[1].plot([x["train_seconds"] for x in e], [x.get(judge, float("nan")) for x in e], **kw)
    axes[0].set(xlabel="samples", ylabel=judge, title="judge vs samples")
    axes[1].set(xlabel="training seconds", ylabel=judge, title="judge vs wall-clock")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
