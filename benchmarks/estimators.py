"""Bias and variance of each gradient estimator against full backpropagation (builtin:digits, digit:3).

Part 1 (bias): a small trainable subset (``conv_out`` weight + bias, 289 parameters) so that means
over a few hundred draws resolve the gradient. Every estimator is drawn K times with independent
seeds through ``chaintune.estimate_gradient`` (n samples, T DDIM steps, eta = 1). Against the mean
of the full-backprop (FB) draws it reports

* cosine similarity and normalised distance ``|mean - mean_FB| / |mean_FB|`` of the means, next to
  the distance that sampling noise alone would give (``noise floor``);
* per-coordinate Welch z-scores: ``mean z^2`` (about 1 when unbiased, >> 1 when biased) and max |z|
  against a Bonferroni bound (1% family-wise over the coordinates);
* the projection of the mean on the FB direction with its 95% confidence interval (unbiased
  estimators' intervals cover FB's value) and the Welch z of its difference to FB's projection;
* verdict "unbiased" when |z(proj)| <= 3 and mean z^2 <= 3. The per-coordinate Bonferroni test
  (max |z| against the 1% family-wise bound) is reported too (``coord_test_passed``) but not used:
  the gradient draws are heavy-tailed (rare draws 10-100x the typical norm, full backprop included),
  which makes a max-over-289-coordinates Welch test anti-conservative at a few hundred draws — the
  full-backprop split-half "null" comparison itself reaches mean z^2 ~ 1.8;
* total variance (trace of the covariance) with a bootstrap 95% interval, and seconds per estimate.

Part 2 (dimension sweep): total variance of FB, half-order (h=2) and zeroth-order against the
number of trainable parameters d (the output-side parameters first, up to all 1.1M). Zeroth-order
variance grows about linearly in d (each draw is a random direction in R^d); first/half-order
variance does not, so the ordering Var FO <= Var HO <= Var ZO of the paper holds only for large d.

    python benchmarks/estimators.py                 # ~10 min on 2 CPU cores
    python benchmarks/estimators.py --all-params    # also the bias table with all 1.1M parameters
    python benchmarks/estimators.py --quick         # CI smoke (< 90 s)
"""

from __future__ import annotations

import math
import sys
import time

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

SUBSET = ("conv_out.weight", "conv_out.bias")


def estimators(scale: float) -> list[tuple[str, object, int]]:
    """(label, estimator, draws) — estimator objects are built lazily by :func:`make`."""
    k = lambda v: max(8, int(round(v * scale)))
    return [
        ("full-backprop", ("full-backprop", {}), k(120)),
        ("truncated k=1", ("truncated-backprop", {"k": 1}), k(40)),
        ("rlr h=2", ("rlr", {"h": 2, "zo": True, "spans": 1}), k(160)),  # the paper's eq. 6
        ("half-order h=1", ("half-order", {"h": 1}), k(100)),
        ("half-order h=2", ("half-order", {"h": 2}), k(100)),
        ("reinforce", ("reinforce", {"normalize_advantages": False, "final_step": "pathwise"}), k(100)),
        ("zeroth-order", ("zeroth-order", {}), k(160)),
    ]


def make(spec: tuple[str, dict]):
    from chaintune.estimators import get_estimator

    name, opts = spec
    return get_estimator(name, **opts)


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps T")
    p.add_argument("--n", type=int, default=8, help="samples per estimate")
    p.add_argument("--draws-scale", type=float, default=1.0, help="multiply every estimator's number of draws")
    p.add_argument("--sweep-draws", type=int, default=16)
    p.add_argument("--sweep-d", default="1,30,300,10000,100000,all", help="trainable-parameter counts to sweep")
    p.add_argument("--all-params", action="store_true", help="also run the bias table with all parameters trainable")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.draws_scale, a.sweep_draws, a.sweep_d = 6, 0.1, 4, "1,all"
    return a


def set_trainable(model, names: list[str]) -> int:
    model.denoiser.requires_grad_(False)
    params = dict(model.denoiser.named_parameters())
    for nm in names:
        params[nm].requires_grad_(True)
    return sum(params[nm].numel() for nm in names)


def output_side(model, target: int | None) -> list[str]:
    """Parameter names taken from the output end of the network until at least ``target`` numbers."""
    named = list(model.denoiser.named_parameters())
    if target is None:
        return [nm for nm, _ in named]
    out, total = [], 0
    for nm, p in reversed(named):
        out.append(nm)
        total += p.numel()
        if total >= target:
            break
    return out


def draw(model, reward, spec, k: int, args, seed0: int):
    """k independent estimates, flattened over the trainable parameters -> ([k, d] tensor, seconds each)."""
    import torch

    import chaintune

    est = make(spec)
    rows, times = [], []
    for s in range(k):
        t0 = time.perf_counter()
        g = chaintune.estimate_gradient(model, reward, est, n=args.n, steps=args.steps, eta=1.0,
                                        generator=torch.Generator().manual_seed(seed0 + s))
        times.append(time.perf_counter() - t0)
        rows.append(torch.cat([v.double().flatten() for v in g.values()]))
    return torch.stack(rows), times


def trace_var_ci(x, reps: int = 500, seed: int = 0) -> tuple[float, float, float]:
    """Total variance (trace of the covariance) of draws ``x`` [k, d], with a bootstrap 95% interval.

    Resamples are evaluated through the k x k Gram matrix (tr Var of a resample with counts c is
    (c . diag(G) - c^T G c / k) / (k - 1)), so the bootstrap costs nothing even for d = 1.1M."""
    import torch

    k = len(x)
    x = x.double() - x.double().mean(0)  # centring is exact here and avoids cancellation at large norms
    gram = x @ x.T
    diag = gram.diagonal()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (reps, k), generator=g)
    c = torch.zeros(reps, k, dtype=x.dtype).scatter_add_(1, idx, torch.ones(reps, k, dtype=x.dtype))
    boots = ((c @ diag) - ((c @ gram) * c).sum(1) / k) / (k - 1)
    boots = sorted(boots.tolist())
    tv = float(x.var(0).sum())
    # a percentile interval of a few draws need not contain the point estimate: widen it so it does
    return tv, min(tv, boots[int(0.025 * reps)]), max(tv, boots[int(0.975 * reps) - 1])


def compare(x, ref) -> dict:
    """Bias statistics of draws ``x`` against reference draws ``ref`` (both [k, d])."""
    import torch

    m, mr = x.mean(0), ref.mean(0)
    se2 = x.var(0) / len(x) + ref.var(0) / len(ref)
    z = (m - mr) / se2.clamp_min(1e-300).sqrt()
    d = x.shape[1]
    u = mr / mr.norm()
    proj = x @ u
    ref_proj = ref @ u
    bonf = math.sqrt(2) * float(torch.erfinv(torch.tensor(1 - 0.01 / d, dtype=torch.float64)))
    tv, lo, hi = trace_var_ci(x)
    half = 1.96 * float(proj.std()) / math.sqrt(len(proj))
    out = {
        "d": d, "draws": len(x),
        "cosine": float(torch.nn.functional.cosine_similarity(m, mr, dim=0)),
        "norm_distance": float((m - mr).norm() / mr.norm()),
        "noise_floor": float(se2.sum().sqrt() / mr.norm()),
        "mean_z2": float((z**2).mean()), "max_abs_z": float(z.abs().max()), "bonferroni_z": bonf,
        "frac_abs_z_gt_3": float((z.abs() > 3).double().mean()),
        "proj_mean": float(proj.mean()), "proj_ci95": [float(proj.mean()) - half, float(proj.mean()) + half],
        "fb_proj_mean": float(ref_proj.mean()),
        "fb_proj_ci95_half": 1.96 * float(ref_proj.std()) / math.sqrt(len(ref_proj)),
        "total_var": tv, "total_var_ci95": [lo, hi], "mean_norm": float(m.norm()),
        "proj_z": (float(proj.mean()) - float(ref_proj.mean()))
        / math.sqrt(float(proj.var()) / len(proj) + float(ref_proj.var()) / len(ref_proj)),
        "coord_test_passed": bool(float(z.abs().max()) < bonf),
        "draw_norm_median": float(x.norm(dim=1).median()), "draw_norm_max": float(x.norm(dim=1).max()),
        "max_draw_share_of_tr_var": float(((x - m) ** 2).sum(1).max() / ((x - m) ** 2).sum()),
    }
    out["unbiased"] = bool(abs(out["proj_z"]) <= 3 and out["mean_z2"] <= 3)
    return out


def bias_table(model, reward, args, names: list[str], scale: float, label: str) -> list[dict]:
    d = set_trainable(model, names)
    C.log(f"\n[{label}] {d:,} trainable parameters, T={args.steps}, n={args.n}")
    specs = estimators(scale)
    data = {}
    for i, (lab, spec, k) in enumerate(specs):
        t0 = time.time()
        x, times = draw(model, reward, spec, k, args, seed0=args.seed * 1_000_000 + 10_000 * (i + 1))
        data[lab] = (x, times)
        C.log(f"  {lab:16s} {k:4d} draws  {time.time() - t0:6.1f}s")
    ref = data["full-backprop"][0]
    rows = []
    for lab, (x, times) in data.items():
        row = {"estimator": lab, **compare(x, ref), "sec_per_estimate": sum(times) / len(times)}
        if lab == "full-backprop":  # self-comparison is meaningless: split-half instead
            h = len(x) // 2
            row.update({k: v for k, v in compare(x[:h], x[h:]).items() if k in (
                "cosine", "norm_distance", "noise_floor", "mean_z2", "max_abs_z", "frac_abs_z_gt_3",
                "proj_z", "coord_test_passed", "unbiased")})
            row["note"] = "bias columns: first half of the FB draws vs second half"
        rows.append(row)
    return rows


def sweep(model, reward, args) -> list[dict]:
    targets = [None if s == "all" else int(s) for s in args.sweep_d.split(",") if s]
    specs = [("full-backprop", ("full-backprop", {})), ("half-order h=2", ("half-order", {"h": 2})),
             ("zeroth-order", ("zeroth-order", {}))]
    out = []
    for target in targets:
        names = output_side(model, target)
        d = set_trainable(model, names)
        row = {"d": d, "params": names if len(names) <= 4 else f"{len(names)} tensors"}
        for si, (lab, spec) in enumerate(specs):
            x, times = draw(model, reward, spec, args.sweep_draws, args,
                            seed0=args.seed * 1_000_000 + 500_000 + 10_000 * si)  # same draws for every d
            tv, lo, hi = trace_var_ci(x)
            row[lab] = {"total_var": tv, "ci95": [lo, hi], "sec": sum(times) / len(times),
                        "mean_norm": float(x.mean(0).norm())}
        row["zo_over_ho"] = row["zeroth-order"]["total_var"] / row["half-order h=2"]["total_var"]
        out.append(row)
        C.log(f"  d={d:>9,}  Var FB {row['full-backprop']['total_var']:.3g}"
              f"  HO {row['half-order h=2']['total_var']:.3g}  ZO {row['zeroth-order']['total_var']:.3g}"
              f"  ZO/HO {row['zo_over_ho']:.3g}")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    import chaintune
    from chaintune.rewards import get_reward

    t_start = time.time()
    model = chaintune.load("builtin:digits")
    reward = get_reward("digit:3")
    result: dict = {"config": {"model": "builtin:digits", "reward": "digit:3", "steps": args.steps, "n": args.n,
                               "eta": 1.0, "subset": list(SUBSET), "draws_scale": args.draws_scale,
                               "sweep_draws": args.sweep_draws, "quick": args.quick, "seed": args.seed},
                    "machine": C.machine()}
    result["bias"] = bias_table(model, reward, args, list(SUBSET), args.draws_scale, "bias, conv_out subset")
    if args.all_params:
        result["bias_all_params"] = bias_table(model, reward, args, output_side(model, None),
                                               args.draws_scale * 0.5, "bias, all parameters")
    C.log("\n[variance against the number of trainable parameters d]")
    result["sweep"] = sweep(model, reward, args)
    result["seconds"] = round(time.time() - t_start, 1)
    out = C.out_dir(args)
    C.write_json(out / "estimators.json", result)
    plot(result, out / "estimators.png")
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    cols = [("estimator", "estimator", "s"), ("draws", "K", "d"), ("cosine", "cos(mean,FB)", ".3f"),
            ("norm_distance", "|m-FB|/|FB|", ".3f"), ("noise_floor", "noise floor", ".3f"),
            ("mean_z2", "mean z^2", ".2f"), ("max_abs_z", "max|z|", ".2f"), ("proj_z", "z(proj)", ".2f"),
            ("proj", "proj on FB dir [95% CI]", "s"),
            ("total_var", "tr Var", ".4g"), ("tv_ci", "tr Var 95% CI", "s"), ("sec_per_estimate", "s/est", ".3f"),
            ("max_draw_share_of_tr_var", "top draw share", ".2f"), ("verdict", "unbiased?", "s")]
    for key, title in (("bias", "conv_out subset"), ("bias_all_params", "all parameters")):
        if key not in result:
            continue
        rows = []
        for r in result[key]:
            rows.append({**r, "proj": f"{r['proj_mean']:.3g} [{r['proj_ci95'][0]:.3g}, {r['proj_ci95'][1]:.3g}]",
                         "tv_ci": f"[{r['total_var_ci95'][0]:.3g}, {r['total_var_ci95'][1]:.3g}]",
                         "verdict": "yes" if r["unbiased"] else "NO (biased)"})
        d = result[key][0]["d"]
        fb = result[key][0]
        print()
        cfg = result["config"]
        print(C.table(rows, cols, title=f"bias/variance vs full backprop — {title}, d={d:,}, T={cfg['steps']}"
                                        f", n={cfg['n']} (FB projection {fb['fb_proj_mean']:.3g} "
                                        f"± {fb['fb_proj_ci95_half']:.2g}; Bonferroni |z| bound "
                                        f"{fb['bonferroni_z']:.2f})"))
    rows = [{"d": r["d"], **{k: r[k]["total_var"] for k in ("full-backprop", "half-order h=2", "zeroth-order")},
             "ratio": r["zo_over_ho"], "order": order(r)} for r in result["sweep"]]
    print()
    print(C.table(rows, [("d", "d", ",d"), ("full-backprop", "tr Var FB", ".4g"),
                         ("half-order h=2", "tr Var HO h=2", ".4g"), ("zeroth-order", "tr Var ZO", ".4g"),
                         ("ratio", "ZO/HO", ".3g"), ("order", "ordering", "s")],
                  title="total variance against trainable parameters d"))
    print(f"\ntotal {result['seconds']:.0f}s")


def order(r: dict) -> str:
    v = {"FO": r["full-backprop"]["total_var"], "HO": r["half-order h=2"]["total_var"],
         "ZO": r["zeroth-order"]["total_var"]}
    return " <= ".join(sorted(v, key=v.get))


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = result["bias"]
    labels = [r["estimator"] for r in rows]
    ax = axes[0]
    means = [r["proj_mean"] for r in rows]
    errs = [(r["proj_ci95"][1] - r["proj_ci95"][0]) / 2 for r in rows]
    colors = ["tab:red" if not r["unbiased"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), means, yerr=errs, color=colors, capsize=3)
    ax.axhline(rows[0]["fb_proj_mean"], color="k", lw=1, ls="--", label="full backprop")
    ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="mean gradient . FB direction", title="bias: projection on FB mean (95% CI)")
    ax.legend(fontsize=8)
    ax = axes[1]
    tv = [r["total_var"] for r in rows]
    ax.bar(range(len(rows)), tv, color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="trace of covariance", title=f"total variance (d={rows[0]['d']})")
    ax = axes[2]
    sw = result["sweep"]
    for k, c in (("full-backprop", "k"), ("half-order h=2", "tab:orange"), ("zeroth-order", "tab:green")):
        ax.errorbar([r["d"] for r in sw], [r[k]["total_var"] for r in sw],
                    yerr=[[r[k]["total_var"] - r[k]["ci95"][0] for r in sw], [r[k]["ci95"][1] - r[k]["total_var"]
                                                                             for r in sw]],
                    fmt="o-", color=c, label=k, capsize=2)
    ax.set(xscale="log", yscale="log", xlabel="trainable parameters d", ylabel="trace of covariance",
           title="variance against d")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
