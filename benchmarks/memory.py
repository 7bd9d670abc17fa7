"""Peak memory of one gradient estimate against the number of sampling steps T (builtin:digits, digit:3).

Estimators: full backprop without and with gradient checkpointing, truncated backprop (k=1), REINFORCE /
DDPO (one log-prob step at a time) and RLR (h=2, paper eq. 6). All 1.1M UNet parameters train, n=16
samples, DDIM eta=1. All but the first row use chaintune's default ``checkpoint=True`` (recompute each
tracked model call in backward). RLR *must*: with ``checkpoint=False`` its zeroth-order steps perturb the
parameters in place after the half-order span saved them for backward, and autograd raises "modified by
an inplace operation" (see the report: ``Perturbation.apply`` should write through ``p.data``).

How memory is measured (CPU): every (estimator, T) runs in a *forked child process* that first resets
its resident-set high-water mark (``/proc/self/clear_refs``), reads its RSS, runs one
``chaintune.estimate_gradient`` and reports ``ru_maxrss - RSS before``: the extra resident memory at
the estimate's peak (graph activations, saved tensors, gradients, ZO parameter copies). The parent has
already imported everything and loaded the model, so imports do not count. The claim to see: RLR,
truncated backprop and REINFORCE flat in T; full backprop growing linearly (with checkpointing: slowly,
one latent per step plus one recomputed step).

    python benchmarks/memory.py            # T = 10, 25, 50, 100 (a few minutes on 2 CPU cores)
    python benchmarks/memory.py --quick    # T = 5, 10 (CI smoke, < 90 s)
"""

from __future__ import annotations

import sys
import time

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

METHODS: dict[str, tuple[str, dict, bool]] = {
    # label: (estimator, options, checkpoint)
    "full-backprop": ("full-backprop", {}, False),
    "full-backprop+ckpt": ("full-backprop", {}, True),
    "truncated k=1": ("truncated-backprop", {"k": 1}, True),
    "reinforce (DDPO)": ("reinforce", {}, True),
    "rlr h=2": ("rlr", {"h": 2, "zo": True, "spans": 1}, True),  # eq. 6, as measured
}


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--steps", default="10,25,50,100", help="comma list of T")
    p.add_argument("--n", type=int, default=16, help="samples per estimate")
    a = p.parse_args(argv)
    if a.quick:
        a.steps = "5,10"
    a.steps_list = [int(s) for s in a.steps.split(",") if s]
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    import torch

    import chaintune
    from chaintune.rewards import get_reward

    t_start = time.time()
    model = chaintune.load("builtin:digits")
    model.denoiser.requires_grad_(True)
    reward = get_reward("digit:3")
    n_params = sum(p.numel() for p in model.denoiser.parameters())
    # warm-up in the parent (lazy initialisations, reward network) so children measure only the estimate
    chaintune.estimate_gradient(model, reward, "truncated-backprop", n=2, steps=2, eta=1.0,
                                generator=torch.Generator().manual_seed(0))

    rows = []
    for T in args.steps_list:
        for label, (est, opts, ckpt) in METHODS.items():
            def work(est=est, opts=opts, ckpt=ckpt, T=T) -> dict:
                g = chaintune.estimate_gradient(model, reward, est, n=args.n, steps=T, eta=1.0, checkpoint=ckpt,
                                                generator=torch.Generator().manual_seed(args.seed), **opts)
                return {"grad_norm": float(torch.sqrt(sum((v.float() ** 2).sum() for v in g.values())))}

            res = C.measure_in_child(work)
            row = {"method": label, "estimator": est, "checkpoint": ckpt, "T": T, **res}
            rows.append(row)
            C.log(f"  {label:20s} T={T:<4d} peak {res.get('peak_mib', float('nan')):8.1f} MiB  "
                  f"{res.get('seconds', float('nan')):6.2f} s {res.get('error', '')}")
    result = {"config": {"steps": args.steps_list, "n": args.n, "eta": 1.0, "model": "builtin:digits",
                         "reward": "digit:3", "trainable_parameters": n_params, "quick": args.quick},
              "method": "forked child per configuration; peak = ru_maxrss - RSS before (MiB)",
              "machine": C.machine(), "rows": rows, "seconds": round(time.time() - t_start, 1)}
    result["growth_mib_per_step"] = growth(rows)
    out = C.out_dir(args)
    C.write_json(out / "memory.json", result)
    plot(result, out / "memory.png")
    print_table(result)
    return result


def growth(rows: list[dict]) -> dict:
    """Least-squares slope of peak memory against T per method (MiB per step)."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["T"], r["peak_mib"]) for r in rows if r["method"] == m and "peak_mib" in r]
        if len(pts) < 2:
            continue
        mx = sum(t for t, _ in pts) / len(pts)
        my = sum(v for _, v in pts) / len(pts)
        den = sum((t - mx) ** 2 for t, _ in pts)
        out[m] = sum((t - mx) * (v - my) for t, v in pts) / den if den else 0.0
    return out


def print_table(result: dict) -> None:
    rows = result["rows"]
    Ts = result["config"]["steps"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["T"]): r for r in rows}
    table_rows = []
    for m in methods:
        row = {"method": m, "slope": result["growth_mib_per_step"].get(m)}
        for T in Ts:
            r = by.get((m, T), {})
            row[f"T{T}"] = r.get("peak_mib")
            row[f"s{T}"] = r.get("seconds")
        table_rows.append(row)
    cols = [("method", "method", "s")] + [(f"T{T}", f"T={T} MiB", ".1f") for T in Ts] + [
        ("slope", "MiB/step", ".2f")] + [(f"s{T}", f"T={T} s", ".2f") for T in Ts]
    print()
    print(C.table(table_rows, cols, title=f"peak extra memory of one gradient estimate (n={result['config']['n']}, "
                                          f"{result['config']['trainable_parameters']:,} trainable params)"))
    print(f"\ntotal {result['seconds']:.0f}s")


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in dict.fromkeys(r["method"] for r in result["rows"]):
        pts = sorted((r["T"], r["peak_mib"], r["seconds"]) for r in result["rows"]
                     if r["method"] == m and "peak_mib" in r)
        if not pts:
            continue
        T, mem, sec = zip(*pts, strict=True)
        axes[0].plot(T, mem, "o-", label=m)
        axes[1].plot(T, sec, "o-", label=m)
    axes[0].set(xlabel="sampling steps T", ylabel="peak extra RSS (MiB)", title="memory of one estimate")
    axes[1].set(xlabel="sampling steps T", ylabel="seconds", title="time of one estimate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
