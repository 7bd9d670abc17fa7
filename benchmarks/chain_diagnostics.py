"""Why an estimator learns or not, on each target: variance between prompts, where the reward is decided, and the
signal-to-noise ratio and direction of each gradient term (``chaintune.diagnostics``).

Targets (``--targets``): ``image`` = builtin:digits with ``digit:5`` (the ranking's target), 20-step DDIM chain;
``video`` = builtin:moving-digits with ``moving-digit`` (prompt fidelity), 10-step flow chain; ``video-smooth`` =
builtin:moving-digits with ``smoothness`` (steady motion of the digit's centroid). Parts (``--parts``):

**variance** — prompt models only: ``groups`` prompts x ``per-group`` clips from the base model; the reward's
variance between prompts and within them (one-way ANOVA) and the variance of the advantages a batch and a
per-prompt leave-one-out baseline give on the same samples.

**decided** — :func:`chaintune.diagnostics.decision_profile`: each step's total-effect index (how much the
reward moves when only that step's noise is redrawn), the share decided in the data half of the chain, and the
span range ``j = a,b`` it recommends for RLR.

**terms** — ``--reps`` independent estimates at the base model's weights (all weights train, as align's
default) of: full backprop (the reference direction), RLR as ``align`` runs it (h = 1, 4 spans, no ZO), its
first-order term alone (truncated backprop k = 1: backprop through step 1 only), one span alone
(``RLR(fo=False, zo=False, spans=1)``), 4
spans alone, zeroth-order on every step but the last (``RLR(fo=False, ho=False, zo=True)``) and DDPO's first
(on-policy)
epoch; the likelihood-ratio ones with the batch baseline and, on prompt models, with the per-prompt
leave-one-out baseline over prompts drawn in groups of ``--group-size``. Per estimator: SNR of one estimate
(|E g|^2 / E|g - E g|^2), cosine of its mean and of one estimate with full backprop's mean, and the norm.

Writes ``chain_diagnostics.json`` and ``chain_diagnostics.png``; prints the tables. One torch thread.

    python benchmarks/chain_diagnostics.py                     # every part, every target (~1 h on 2 cores)
    python benchmarks/chain_diagnostics.py --parts terms --targets video --reps 24
    python benchmarks/chain_diagnostics.py --quick             # CI smoke (< 90 s)
"""

from __future__ import annotations

import sys
import time

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

TARGETS = {  # name -> (model, reward, chain steps, samples per estimate)
    "image": ("builtin:digits", "digit:5", 20, 32),
    "video": ("builtin:moving-digits", "moving-digit", 10, 16),
    "video-smooth": ("builtin:moving-digits", "smoothness", 10, 16),
}


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    p.add_argument("--parts", default="variance,decided,terms", help="comma list of variance, decided, terms")
    p.add_argument("--reps", type=int, default=16, help="terms: independent estimates per estimator")
    p.add_argument("--group-size", type=int, default=4, help="terms/variance: samples per prompt")
    p.add_argument("--groups", type=int, default=24, help="variance: prompts drawn")
    p.add_argument("--per-group", type=int, default=8, help="variance: samples per prompt")
    p.add_argument("--decided-n", type=int, default=64, help="decided: samples")
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.groups, a.per_group, a.decided_n = 2, 3, 2, 4
        a.targets = "image,video" if a.targets == ",".join(TARGETS) else a.targets
    a.target_list = [t for t in a.targets.split(",") if t]
    a.part_list = [t for t in a.parts.split(",") if t]
    bad = [t for t in a.target_list if t not in TARGETS]
    if bad:
        p.error(f"unknown targets {bad}; choose from {list(TARGETS)}")
    return a


def term_estimators(model) -> dict[str, tuple[object, str]]:
    """name -> (estimator, baseline); the per-prompt baseline only where prompts (or labels) repeat."""
    from chaintune.estimators import RLR, FullBackprop, Reinforce, TruncatedBackprop

    out: dict[str, tuple[object, str]] = {
        "full backprop (reference)": (FullBackprop(), "batch"),
        "FO term (step 1)": (TruncatedBackprop(k=1), "batch"),  # RLR's first-order term exactly
    }
    baselines = ["batch", "prompt"] if (model.takes_prompts or model.takes_labels) else ["batch"]
    for b in baselines:
        out[f"rlr as align runs it [{b}]"] = (RLR(h=1, spans=4, zo=False), b)
        out[f"span term, 1 span [{b}]"] = (RLR(h=1, spans=1, fo=False, zo=False), b)
        out[f"span term, 4 spans [{b}]"] = (RLR(h=1, spans=4, fo=False, zo=False), b)
        out[f"ZO terms [{b}]"] = (RLR(h=1, fo=False, ho=False, zo=True), b)
        out[f"ddpo, 1st epoch [{b}]"] = (Reinforce(), b)
    return out


def run_terms(args, name: str, model, reward: str, steps: int, n: int) -> list[dict]:
    from chaintune.diagnostics import gradient_quality

    t0 = time.time()
    q = gradient_quality(model, reward, term_estimators(model), reference="full backprop (reference)",
                         reps=args.reps, n=n, steps=steps, seed=args.seed,
                         group_size=args.group_size if (model.takes_prompts or model.takes_labels) else 1)
    C.log(f"  [{name}] terms: {time.time() - t0:.0f}s")
    return [{"target": name, "estimator": label, **v} for label, v in q.items()]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    import torch

    import chaintune
    from chaintune.diagnostics import decision_profile, variance_split

    t_start = time.time()
    result: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "machine": C.machine(),
                    "variance": [], "decided": [], "terms": []}
    for name in args.target_list:
        model_id, reward, steps, n = TARGETS[name]
        if args.quick:
            steps, n = 4, 4
        model = chaintune.load(model_id, device="cpu")
        model.denoiser.requires_grad_(True)
        if "variance" in args.part_list and (model.takes_prompts or model.takes_labels):
            t0 = time.time()
            v = variance_split(model, reward, groups=args.groups, per_group=args.per_group, steps=steps,
                               generator=torch.Generator().manual_seed(args.seed))
            result["variance"].append({"target": name, "reward": reward, **v})
            C.log(f"  [{name}] variance: {v['share_between']:.0%} between prompts ({time.time() - t0:.0f}s)")
        if "decided" in args.part_list:
            t0 = time.time()
            with torch.no_grad():
                p = decision_profile(model, reward, n=args.decided_n, steps=steps,
                                     generator=torch.Generator().manual_seed(args.seed))
            result["decided"].append({"target": name, "reward": reward, **p.as_dict()})
            C.log(f"  [{name}] decided {p.where()} (late share {p.late_share():.2f}, span range {p.span_range()}; "
                  f"{time.time() - t0:.0f}s)")
        if "terms" in args.part_list:
            result["terms"] += run_terms(args, name, model, reward, steps, n)
        C.write_json(C.out_dir(args) / "chain_diagnostics.json", result)  # partial results as they come
    result["seconds"] = round(time.time() - t_start, 1)
    out = C.out_dir(args)
    C.write_json(out / "chain_diagnostics.json", result)
    plot(result, out / "chain_diagnostics.png")
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    if result["variance"]:
        print()
        print(C.table(result["variance"], [
            ("target", "target", "s"), ("reward", "reward", "s"), ("share_between", "between prompts", ".0%"),
            ("between", "var between", ".4f"), ("within", "var within", ".4f"),
            ("advantage_var_batch", "adv var, batch", ".4f"), ("advantage_var_prompt", "adv var, per prompt", ".4f")],
            title="reward variance: between prompts vs within (base model)"))
    if result["decided"]:
        print()
        rows = [{**d, "profile": " ".join(f"{v:.2f}" for v in d["total_effect"]), "span": f"{d['span_range'][0]},"
                 f"{d['span_range'][1]}"} for d in result["decided"]]
        print(C.table(rows, [("target", "target", "s"), ("reward", "reward", "s"), ("where", "decided", "s"),
                             ("late_share", "late share", ".2f"), ("centre", "centre (paper step)", ".1f"),
                             ("initial", "x_T", ".2f"), ("span", "--j", "s"), ("profile", "total effect t=1..T", "s")],
                      title="where along the chain the reward is decided (total-effect index per paper step)"))
    if result["terms"]:
        print()
        print(C.table(result["terms"], [("target", "target", "s"), ("estimator", "estimate", "s"),
                                        ("snr", "SNR (one estimate)", ".4f"), ("cos_mean", "cos(mean, FB)", ".3f"),
                                        ("cos_single", "cos(one, FB)", ".3f"), ("norm", "|mean|", ".3g"),
                                        ("noise", "noise", ".3g")],
                      title=f"gradient terms at the base weights ({result['config']['reps']} estimates each)"))
    print(f"\ntotal {result.get('seconds', 0):.0f}s")


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for d in result["decided"]:
        te = d["total_effect"]
        axes[0].plot(range(1, len(te) + 1), [v / (sum(te) or 1) for v in te], marker="o", ms=3,
                     label=f"{d['target']} ({d['reward']})")
    axes[0].set(xlabel="paper step t (1 = data end)", ylabel="share of total effect",
                title="where the reward is decided")
    axes[0].legend(fontsize=7)
    rows = result["terms"]
    if rows:
        labels = [f"{r['target']}: {r['estimator']}" for r in rows]
        axes[1].barh(range(len(rows)), [max(r["snr"], 1e-6) for r in rows])
        axes[1].set_xscale("log")
        axes[1].set_yticks(range(len(rows)), labels, fontsize=6)
        axes[1].set(xlabel="SNR of one estimate", title="gradient terms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
