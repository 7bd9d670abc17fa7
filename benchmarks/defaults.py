"""Which ``chaintune align`` defaults work on every target: a coarse-to-fine sweep on builtin:digits.

The defaults must not hack the reward on any target, so every setting is judged on several targets
and scored by its worst one. Each run is judged on its FINAL evaluation (the samples a user gets):

* ``share``: share of the target digit by the held-out classifier (``eval/class_share``, a judge
  training never saw);
* ``nn ratio``: ``eval/nn_distance`` at the end over the base model's (step 0). Base samples score
  ~0.12, noise ~0.44; a rising ratio means the samples left the digit manifold (reward hacking);
* ``diversity`` at the end over the base model's (collapse to one image drives it to 0).

A run passes when share >= 0.8 and nn ratio <= 1.3, and no evaluation along the way would have made the
default hacking guard act (nn ratio > 1.3 or diversity < 0.5x at any evaluation: with the guard on, as
it is by default, such a run is rolled back and ends elsewhere; the sweep runs with the guard off so that
each setting shows what it does by itself). A setting's score is the worst-case over its runs of the
"effective share" (the share, or 0 where the run failed the nn or guard bound); ties break by the mean
share. The best evaluation by held-out reward in the run (what a keep-the-best guard would
restore) is recorded next to the final one, for reference only.

A black-box reward (``jpeg-compressibility``: RLR's last step is then perturbed, not pathwise) checks
that the winner also improves a reward it cannot differentiate without collapsing: its reward gain,
diversity ratio and nn ratio (measured on the final model's evaluation samples, since the JPEG family
logs no nn-distance itself).

Stages (every setting option is pinned, so changing AlignConfig's defaults does not change a run):

1. ``STAGE1_DEFAULT`` candidates around the demo settings on ``--stage1-targets`` (digit:4, digit:7), seed 0;
2. the best ``--top`` (4) of stage 1, plus the best ``j = uniform`` one if none of those is, on every target
   (digit:1, 4, 7, 9) with seeds 0 and 1, plus jpeg-compressibility with seed 0 (stage-1 runs are reused).
   A setting's remaining runs are skipped once one of its digit runs fails (``--no-prune`` runs them);
3. DDPO (``--estimator reinforce``) with the winner's other settings on digit:7, for reference.

Only a ``j = uniform`` setting can be the default: ``j = a,b`` is in paper steps, fails validation for
chains shorter than b and means another part of a longer chain. Runs are separate processes
(``CHAINTUNE_THREADS=1``), ``--jobs`` (2) at a time. The sweep is resumable: a run whose JSON exists under
``--cache`` is not run again; ``--collect`` only tabulates what is cached.

    python benchmarks/defaults.py            # 60-90 min on a shared 2-core CPU (1.5-5 min a run)
    python benchmarks/defaults.py --quick    # 2 tiny runs (CI smoke, < 60 s)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

# Every training option pinned (the demo's RLR settings: chaintune/align/demo.py, RLR_DEMO + DEMO_DEFAULTS).
BASE = dict(model="builtin:digits", estimator="rlr", h=1, zo=False, ho=True, j="10,20", spans=4, sigma=1e-3,
            shared_perturbation=False, baseline="batch", kl_weight=0.01, kl_samples=4, retention_weight=0.0,
            lr=1e-4, lr_schedule="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, ema_decay=0.0,
            steps=150, batch_size=32, grad_accum=1, sample_steps=20, eta=1.0, scheduler="ddim", peft="none",
            mixed_precision="no", gradient_checkpointing=True, heldout_reward="auto",
            eval_every=25, eval_samples=64, save_every=0, tensorboard=False, progress=False, report=False,
            device="cpu",
            # the hacking guard off and the last step's weights kept: a setting is judged on what it does itself
            # (with the guard a hacking run is rolled back, which hides it), on its final samples
            on_hacking="off", final_model="last")

# name -> overrides of BASE. "old defaults" is what `chaintune align` did before this sweep (README's example).
STAGE1: dict[str, dict] = {
    "old defaults": dict(lr=3e-4, lr_schedule="constant", kl_weight=0.0, spans=1, j="uniform", steps=100),
    "demo": {},
    "lr 2e-4": dict(lr=2e-4),
    "kl 0.03": dict(kl_weight=0.03),
    "kl 0": dict(kl_weight=0.0),
    "spans 1 j uniform": dict(spans=1, j="uniform"),
    "constant lr": dict(lr_schedule="constant"),
    "h 2": dict(h=2),
    "100 steps lr 2e-4": dict(steps=100, lr=2e-4),
    # j = 10,20 only exists for >= 20 sample steps and means another part of a 50-step chain: can uniform do?
    "j uniform": dict(j="uniform"),
    "100 steps lr 2e-4 j uniform": dict(steps=100, lr=2e-4, j="uniform"),
    "100 steps lr 2e-4 spans 1 j uniform": dict(steps=100, lr=2e-4, j="uniform", spans=1),
    # what `chaintune align` ships, guard included: the hacking guard rolls back and the best evaluation is kept
    "as shipped": dict(j="uniform", on_hacking="rollback", final_model="best"),
    # session 8, for digit:9 seed 0 (the one target/seed the shipped defaults miss): less span noise, more samples
    "as shipped spans 8": dict(j="uniform", on_hacking="rollback", final_model="best", spans=8),
    "as shipped 250 steps": dict(j="uniform", on_hacking="rollback", final_model="best", steps=250),
}
# What the default sweep runs in stage 1: "constant lr" and "h 2" are left out to fit ~60 min on a shared 2-core
# box (cosine vs constant was measured for the demo, docs/results.md "RLR settings"; run them with --stage1).
STAGE1_DEFAULT = ["old defaults", "demo", "lr 2e-4", "kl 0.03", "kl 0", "spans 1 j uniform", "100 steps lr 2e-4",
                  "100 steps lr 2e-4 j uniform", "100 steps lr 2e-4 spans 1 j uniform", "j uniform"]
STAGE1_TARGETS = ["digit:4", "digit:7"]
DIGITS = ["digit:1", "digit:4", "digit:7", "digit:9"]
BLACK_BOX = "jpeg-compressibility"
SEEDS = [0, 1]
PASS_SHARE, MAX_NN_RATIO = 0.8, 1.3
SUMMARY_KEYS = ("eval/reward", "eval/heldout_reward", "eval/class_share", "eval/nn_distance", "eval/diversity")


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (separate processes)")
    p.add_argument("--top", type=int, default=4, help="stage-1 settings carried to stage 2")
    p.add_argument("--stage1", default=",".join(STAGE1_DEFAULT), help="comma list of stage-1 settings (STAGE1 names)")
    p.add_argument("--stage1-targets", default=",".join(STAGE1_TARGETS))
    p.add_argument("--targets", default=",".join(DIGITS), help="stage-2 digit targets")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="stage-2 seeds")
    p.add_argument("--black-box", default=BLACK_BOX, help="black-box reward checked in stage 2 ('' for none)")
    p.add_argument("--cache", type=Path, default=None,
                   help="per-run result JSONs (default OUT/defaults_runs; existing ones are not rerun)")
    p.add_argument("--no-prune", dest="prune", action="store_false",
                   help="run every stage-2 run (default: skip the rest of a setting once one of its digit runs "
                        "fails the acceptance bounds: it can no longer be a default that works on every target)")
    p.add_argument("--collect", action="store_true", help="run nothing: tabulate the cached runs")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one spec file (child process)
    a = p.parse_args(argv)
    a.stage1_list = [s for s in a.stage1.split(",") if s]
    bad = [s for s in a.stage1_list if s not in STAGE1]
    if bad:
        p.error(f"unknown settings {bad}; choose from {list(STAGE1)}")
    a.stage1_target_list = [t for t in a.stage1_targets.split(",") if t]
    a.target_list = [t for t in a.targets.split(",") if t]
    a.seed_list = [int(s) for s in a.seeds.split(",") if s]
    if a.quick:  # 2 tiny runs, no stage 2
        a.stage1_list, a.stage1_target_list, a.target_list, a.seed_list, a.black_box = \
            ["demo"], ["digit:4", BLACK_BOX], [], [], ""
    return a


QUICK = dict(steps=2, batch_size=4, eval_every=0, eval_samples=16, spans=1)


# ------------------------------------------------------------------------------ one run (child process)


def run_one(spec: dict) -> dict:
    """Align with ``spec['opts']`` and summarise: the first, final and best-by-held-out evaluations."""
    C.setup_threads(1)
    import torch

    import chaintune
    from chaintune.align import AlignConfig, align_run, read_metrics
    from chaintune.metrics import nearest_real_distance, pairwise_diversity
    from chaintune.sampling import chain_scheduler, sample

    opts = spec["opts"]
    cfg = AlignConfig.from_dict(opts)
    t0 = time.time()
    res = align_run(cfg, overwrite=True)
    wall = time.time() - t0
    metrics = read_metrics(res.out)
    evals = [{k: v for k, v in m.items() if k.startswith("eval/") or k == "step"} for m in metrics
             if "eval/reward" in m]
    first, final = evals[0], evals[-1]
    out = {"key": spec["key"], "setting": spec["setting"], "target": opts["reward"], "seed": opts["seed"],
           "opts": opts, "wall_seconds": round(wall, 1), "evals": evals, "first": first, "final": final}
    with_heldout = [e for e in evals if "eval/heldout_reward" in e]
    if with_heldout:
        out["best_heldout"] = max(with_heldout, key=lambda e: e["eval/heldout_reward"])
    if "eval/nn_distance" not in final:  # e.g. JPEG: its family logs no realism metric; measure the eval samples
        def realism(model) -> dict:
            gen = torch.Generator().manual_seed(10_000 + cfg.run.seed)  # the evaluation's held-out seeds
            imgs = sample(model, cfg.eval.eval_samples, steps=cfg.chain.sample_steps, eta=cfg.chain.eta,
                          generator=gen, scheduler=chain_scheduler(model, cfg.chain.scheduler)).images
            return {"eval/nn_distance": nearest_real_distance(imgs), "eval/diversity_check": pairwise_diversity(imgs)}

        with torch.no_grad():
            first.update(realism(chaintune.load(cfg.chain.model, device="cpu")))
            final.update(realism(res.model))
    return out


def summarise(r: dict) -> dict:
    """The judged numbers of one run (final evaluation) and of its best-by-held-out evaluation."""
    f, z = r["final"], r["first"]
    nn0, nn1 = z.get("eval/nn_distance"), f.get("eval/nn_distance")
    row = {"setting": r["setting"], "target": r["target"], "seed": r["seed"], "wall_seconds": r["wall_seconds"],
           "share": f.get("eval/class_share"), "share0": z.get("eval/class_share"),
           "nn": nn1, "nn0": nn0, "nn_ratio": (nn1 / nn0) if nn0 and nn1 is not None else None,
           "diversity_ratio": f["eval/diversity"] / z["eval/diversity"] if z.get("eval/diversity") else None,
           "reward0": z["eval/reward"], "reward": f["eval/reward"], "heldout": f.get("eval/heldout_reward")}
    if nn0 and z.get("eval/diversity"):  # what the default hacking guard (tolerance 1.3, collapse 0.5) would act on
        alarms = [e["step"] for e in r["evals"][1:] if "eval/nn_distance" in e
                  and (e["eval/nn_distance"] / nn0 > MAX_NN_RATIO or e["eval/diversity"] / z["eval/diversity"] < 0.5)]
        row["guard_alarm"] = alarms[0] if alarms else None
    b = r.get("best_heldout")
    if b is not None:
        row.update(best_step=b["step"], best_share=b.get("eval/class_share"),
                   best_nn_ratio=(b["eval/nn_distance"] / nn0) if nn0 and "eval/nn_distance" in b else None)
    if row["share"] is not None:  # a run the default guard would roll back is not what a user gets: it fails
        ok = (row["nn_ratio"] or 9) <= MAX_NN_RATIO and row.get("guard_alarm") is None
        row["passed"] = bool(row["share"] >= PASS_SHARE and ok)
        row["effective_share"] = row["share"] if ok else 0.0
    return row


# ------------------------------------------------------------------------------ orchestration


def run_key(setting: str, target: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{setting}__{target}__s{seed}")
    return safe


def run_all(specs: list[dict], args, cache: Path, run_root: Path, prune: bool = False) -> list[dict]:
    """Run the specs not cached yet, ``args.jobs`` processes at a time; return every spec's result."""
    todo = [] if args.collect else [s for s in specs if not (cache / f"{s['key']}.json").exists()]
    C.log(f"  {len(specs) - len(todo)} cached, {len(todo)} to run")
    failed: dict[str, str] = {}  # setting -> a digit run that failed the acceptance bounds (it cannot be the default)

    def note(s: dict) -> None:
        path = cache / f"{s['key']}.json"
        if prune and path.exists():
            row = summarise(json.loads(path.read_text()))
            if row.get("passed") is False:
                failed.setdefault(s["setting"], f"{row['target']} seed {row['seed']}: share {row['share']:.0%}, "
                                                f"nn ratio {row['nn_ratio']:.2f}")

    for s in specs:
        note(s)
    env = dict(os.environ, CHAINTUNE_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MPLBACKEND="Agg")
    running: list[tuple[subprocess.Popen, dict, float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            s = todo.pop(0)
            if s["setting"] in failed:  # it cannot be a default that works on every target any more
                C.log(f"  skipped {s['key']} ({s['setting']} failed on {failed[s['setting']]})")
                continue
            s["opts"]["out"] = str(run_root / s["key"])
            spec_file = cache / f"{s['key']}.spec.json"
            spec_file.write_text(json.dumps(s))
            log = open(cache / f"{s['key']}.log", "w")
            p = subprocess.Popen([sys.executable, __file__, "--one", str(spec_file)], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, cwd=C.ROOT.parent)
            running.append((p, s, time.time()))
        time.sleep(1)
        for p, s, t in list(running):
            if p.poll() is None:
                continue
            running.remove((p, s, t))
            path = cache / f"{s['key']}.json"
            if p.returncode != 0 or not path.exists():
                C.log(f"  FAILED {s['key']} (rc {p.returncode}; see {cache / (s['key'] + '.log')})")
                continue
            note(s)
            row = summarise(json.loads(path.read_text()))
            C.log(f"  {s['setting']:<22} {s['opts']['reward']:<22} s{s['opts']['seed']}  "
                  f"share {C.fmt(row['share'], '.0%'):>4}  nn x{C.fmt(row['nn_ratio'], '.2f')}  "
                  f"div x{C.fmt(row['diversity_ratio'], '.2f')}  reward {row['reward0']:+.3f} -> {row['reward']:+.3f}"
                  f"  ({time.time() - t:.0f}s)")
    return [json.loads((cache / f"{s['key']}.json").read_text()) for s in specs
            if (cache / f"{s['key']}.json").exists()]


def spec(setting: str, target: str, seed: int, quick: bool, **extra) -> dict:
    opts = dict(BASE, **STAGE1[setting], reward=target, seed=seed, **extra)
    if quick:
        opts.update(QUICK)
    label = setting + "".join(f" {k}={v}" for k, v in extra.items())
    return {"key": run_key(label, target, seed), "setting": label, "opts": opts}


def score(rows: list[dict]) -> dict:
    """A setting's score over its digit runs: worst-case effective share, then mean share."""
    digit = [r for r in rows if r.get("share") is not None]
    if not digit:
        return {"worst": None, "mean_share": None, "passed": 0, "runs": 0}
    return {"worst": min(r["effective_share"] for r in digit),
            "mean_share": statistics.mean(r["share"] for r in digit),
            "max_nn_ratio": max(r["nn_ratio"] for r in digit), "passed": sum(r["passed"] for r in digit),
            "runs": len(digit), "targets": sorted({r["target"] for r in digit}),
            "seeds": sorted({r["seed"] for r in digit})}


def deployable(setting: str) -> bool:
    """Can this setting be AlignConfig's default? ``j = a,b`` is in paper steps: it fails validation for chains
    shorter than b and means another part of a longer chain, so only ``j = uniform`` settings qualify."""
    return dict(BASE, **STAGE1[setting])["j"] == "uniform"


def choose_finalists(ranked1: list[tuple[str, dict]], top: int) -> list[str]:
    """The ``top`` best of stage 1, plus the best deployable setting with a passing stage-1 score when none of
    them is deployable enough; deployable ones first (they run first, in case the sweep is cut short)."""
    names = [s for s, _ in ranked1[:top]]
    extra = next((s for s, sc in ranked1[top:] if deployable(s) and (sc["worst"] or 0) >= PASS_SHARE), None)
    if extra:
        names.append(extra)
    return sorted(names, key=lambda s: not deployable(s))


def rank(rows: list[dict], settings: list[str]) -> list[tuple[str, dict]]:
    scored = [(s, score([r for r in rows if r["setting"] == s])) for s in settings]
    return sorted(scored, key=lambda x: (-(x[1]["worst"] if x[1]["worst"] is not None else -1),
                                         -(x[1]["mean_share"] or 0)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one:
        s = json.loads(Path(args.one).read_text())
        result = run_one(s)
        C.write_json(Path(args.one).with_name(f"{s['key']}.json"), result)
        return result
    t_start = time.time()
    out = C.out_dir(args)
    cache = args.cache or (out / "tmp" / "defaults_runs" if not args.quick else out / "defaults_runs")
    cache.mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(prefix="chaintune-defaults-"))
    C.log(f"stage 1: {len(args.stage1_list)} settings x {args.stage1_target_list}, seed {args.seed}")
    specs1 = [spec(s, t, args.seed, args.quick) for s in args.stage1_list for t in args.stage1_target_list]
    runs = run_all(specs1, args, cache, run_root)
    rows1 = [summarise(r) for r in runs]
    ranked1 = rank(rows1, args.stage1_list)
    finalists = choose_finalists(ranked1, args.top) if args.target_list else []
    rows2: list[dict] = []
    if finalists:
        C.log(f"stage 2: {finalists} x {args.target_list} x seeds {args.seed_list}"
              + (f" + {args.black_box} (seed {args.seed_list[0]})" if args.black_box else ""))
        specs2 = [spec(s, t, seed, args.quick) for s in finalists for t in args.target_list for seed in args.seed_list]
        if args.black_box:
            specs2 += [spec(s, args.black_box, args.seed_list[0], args.quick) for s in finalists]
        runs2 = run_all(specs2, args, cache, run_root, prune=args.prune)
        rows2 = [summarise(r) for r in runs2]
    # a finalist without every target at the first seed and no failure (the sweep was stopped) is not ranked
    full = {(t, args.seed_list[0]) for t in args.target_list}  # every target at the first seed, at least
    unmeasured = [s for s in finalists
                  if not any(r["setting"] == s and r.get("passed") is False for r in rows2)
                  and not full <= {(r["target"], r["seed"]) for r in rows2 if r["setting"] == s}]
    ranked2 = rank(rows2, [s for s in finalists if s not in unmeasured]) if finalists else []
    ranking = ranked2 or ranked1
    best_any = ranking[0][0] if ranking else None
    winner = next((s for s, _ in ranking if deployable(s)), None)
    ddpo: list[dict] = []
    if winner and finalists:  # does DDPO train with the winner's optimiser and guard settings (one target, seed)?
        C.log(f"DDPO check: estimator reinforce with {winner!r}'s other settings on digit:7")
        ddpo = [summarise(r) for r in run_all([spec(winner, "digit:7", args.seed_list[0], args.quick,
                                                    estimator="reinforce")], args, cache, run_root)]
        ddpo += [summarise(json.loads(f.read_text())) for f in sorted(cache.glob("*estimator_reinforce*.json"))
                 if not f.name.endswith(".spec.json") and not any(f.stem == run_key(r["setting"], r["target"],
                                                                                    r["seed"]) for r in ddpo)]
    shutil.rmtree(run_root, ignore_errors=True)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "cache", "one")},
              "machine": C.machine(), "base": BASE, "settings": {s: STAGE1[s] for s in args.stage1_list},
              "criteria": {"share": PASS_SHARE, "max_nn_ratio": MAX_NN_RATIO,
                           "score": "worst-case effective share over digit targets x seeds (share, or 0 where "
                                    "the final nn ratio > 1.3 or the default hacking guard would have acted); "
                                    "tie-break mean share"},
              "stage1": {"rows": rows1, "ranking": ranked1}, "stage2": {"rows": rows2, "ranking": ranked2},
              "ddpo_check": ddpo, "unmeasured_finalists": unmeasured,
              # every run in the cache, including stage-2 runs of settings that are finalists no more
              "all_runs": [summarise(json.loads(f.read_text())) for f in sorted(cache.glob("*.json"))
                           if not f.name.endswith(".spec.json")],
              "winner": winner, "winner_options": dict(BASE, **STAGE1[winner]) if winner else None,
              "best_any": best_any, "deployable": "a default's j must be 'uniform': j = a,b (paper steps) fails "
                                                "validation for sample_steps < b and means another part of a "
                                                "longer chain",
              "seconds": round(time.time() - t_start, 1)}
    name = "defaults"
    C.write_json(out / f"{name}.json", result)
    plot(result, out / f"{name}.png")
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    for stage in ("stage1", "stage2", "ddpo_check"):
        rows = result[stage] if stage == "ddpo_check" else result[stage]["rows"]
        if not rows:
            continue
        print()
        print(C.table(sorted(rows, key=lambda r: (r["setting"], r["target"], r["seed"])), [
            ("setting", "setting", "s"), ("target", "target", "s"), ("seed", "seed", "d"),
            ("share0", "share@0", ".0%"), ("share", "share", ".0%"), ("nn_ratio", "nn ratio", ".2f"),
            ("diversity_ratio", "div ratio", ".2f"), ("reward0", "reward@0", ".3f"), ("reward", "reward", ".3f"),
            ("best_step", "best@", "d"), ("best_share", "best share", ".0%"), ("guard_alarm", "guard@", "d"),
            ("wall_seconds", "time", ".0f")],
            title=f"{stage}: final evaluation (share: held-out classifier; nn ratio: nn-distance / base; "
                  f"best: best-by-held-out evaluation, for reference; guard@: first evaluation the default "
                  f"hacking guard would act on: nn ratio > 1.3 or diversity < 0.5x)"))
        if stage == "ddpo_check":
            continue
        print()
        print(C.table([{"setting": s, **sc} for s, sc in result[stage]["ranking"]], [
            ("setting", "setting", "s"), ("worst", "worst eff. share", ".0%"), ("mean_share", "mean share", ".0%"),
            ("max_nn_ratio", "max nn ratio", ".2f"), ("passed", "passed", "d"), ("runs", "runs", "d")],
            title=f"{stage} ranking (pass: share >= {PASS_SHARE:.0%} and nn ratio <= {MAX_NN_RATIO})"))
    if result.get("unmeasured_finalists"):
        print(f"\nnot ranked (stage 2 cut short, worst case unknown): {', '.join(result['unmeasured_finalists'])}")
    print(f"\nwinner (j uniform, valid for any chain): {result['winner']}   best of any: {result['best_any']}   "
          f"total {result['seconds']:.0f}s")


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    rows = result["stage1"]["rows"] + result["stage2"]["rows"]
    seen: dict[tuple, dict] = {}
    for r in rows:
        seen[(r["setting"], r["target"], r["seed"])] = r
    rows = list(seen.values())
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for i, s in enumerate(settings):
        rs = [r for r in rows if r["setting"] == s]
        dig = [r for r in rs if r.get("share") is not None]
        axes[0].scatter([r["nn_ratio"] for r in dig], [r["share"] for r in dig], label=s, color=f"C{i % 10}", s=22)
        axes[1].scatter([i] * len(dig), [r["share"] for r in dig], color=f"C{i % 10}", s=18)
        bb = [r for r in rs if r.get("share") is None]
        axes[2].scatter([r["diversity_ratio"] for r in bb], [r["reward"] - r["reward0"] for r in bb],
                        color=f"C{i % 10}", s=30, label=s)
    axes[0].axhline(PASS_SHARE, ls=":", c="k")
    axes[0].axvline(MAX_NN_RATIO, ls=":", c="k")
    axes[0].set(xlabel="nn-distance / base (final)", ylabel="share of target (held-out classifier, final)",
                title="every digit run: pass = upper left")
    axes[0].legend(fontsize=7)
    axes[1].axhline(PASS_SHARE, ls=":", c="k")
    axes[1].set_xticks(range(len(settings)), settings, rotation=35, ha="right", fontsize=7)
    axes[1].set(ylabel="share of target (final)", title="share per setting (all targets, seeds)")
    axes[2].set(xlabel="diversity / base (final)", ylabel="reward gain", title=f"black box ({BLACK_BOX})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
