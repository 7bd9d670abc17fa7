"""Sampling speed of ``chaintune.sample`` against diffusers' own ``DDIMPipeline`` on the same UNet.

Both run builtin:digits' ``UNet2DModel`` with a ``DDIMScheduler`` built from the model's scheduler
config, the same batch and the same number of steps, for eta = 0 and eta = 1. The two samplers are
timed alternately in one process (repetitions interleaved, median reported) so that load on a shared
machine hits both alike. chaintune records the whole trajectory (latents, means, noise, log-probs);
the pipeline keeps only the current latent, so the ratio prices that bookkeeping.

Agreement: for eta = 0 both start from the same x_T (the pipeline draws it from a generator with the
same seed, drawn first) and are deterministic, so their images must agree to float32 round-off
(chaintune computes the schedule coefficients in float64). For eta = 1 the images are compared too:
both draw x_T and then one noise tensor per step from the same generator in the same order, so they
agree as well (reported, not required).

    python benchmarks/sampler.py            # 64 samples, 50 steps, 7 repetitions
    python benchmarks/sampler.py --quick    # 16 samples, 20 steps, 3 repetitions
"""

from __future__ import annotations

import statistics
import sys
import time

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.steps, a.reps = 16, 20, 3
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.setup_threads(1)
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler

    import chaintune

    t_start = time.time()
    model = chaintune.load("builtin:digits")
    model.denoiser.eval().requires_grad_(False)
    pipe = DDIMPipeline(unet=model.denoiser, scheduler=DDIMScheduler.from_config(model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)

    def ours(eta: float, seed: int) -> torch.Tensor:
        tr = chaintune.sample(model, args.n, steps=args.steps, eta=eta, generator=torch.Generator().manual_seed(seed))
        return tr.images

    def theirs(eta: float, seed: int) -> torch.Tensor:
        out = pipe(batch_size=args.n, generator=torch.Generator().manual_seed(seed), eta=eta,
                   num_inference_steps=args.steps, output_type="np")
        return torch.from_numpy(out.images).permute(0, 3, 1, 2)  # NHWC in [0, 1] -> NCHW

    rows = []
    for eta in (0.0, 1.0):
        ours(eta, 0)  # warm-up both
        theirs(eta, 0)
        t_ours, t_theirs = [], []
        for r in range(args.reps):
            order = [(ours, t_ours), (theirs, t_theirs)]
            for fn, acc in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn(eta, 100 + r)
                acc.append(time.perf_counter() - t0)
        a, b = ours(eta, 7), theirs(eta, 7)
        diff = (a.float() - b.float()).abs()
        row = {"eta": eta, "n": args.n, "steps": args.steps, "reps": args.reps,
               "chaintune_s": statistics.median(t_ours), "diffusers_s": statistics.median(t_theirs),
               "chaintune_all_s": t_ours, "diffusers_all_s": t_theirs,
               "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
        row["ratio"] = row["chaintune_s"] / row["diffusers_s"]
        row["agree"] = bool(row["max_abs_diff"] < 1e-3)
        rows.append(row)
        C.log(f"  eta={eta}: chaintune {row['chaintune_s']:.3f}s  diffusers {row['diffusers_s']:.3f}s  "
              f"ratio {row['ratio']:.2f}  max|diff| {row['max_abs_diff']:.2e}")
    result = {"config": {"model": "builtin:digits", "n": args.n, "steps": args.steps, "reps": args.reps,
                         "quick": args.quick}, "machine": C.machine(), "rows": rows,
              "seconds": round(time.time() - t_start, 1)}
    out = C.out_dir(args)
    C.write_json(out / "sampler.json", result)
    plot(result, out / "sampler.png")
    print()
    print(C.table(rows, [("eta", "eta", ".1f"), ("n", "n", "d"), ("steps", "steps", "d"),
                         ("chaintune_s", "chaintune s", ".3f"), ("diffusers_s", "DDIMPipeline s", ".3f"),
                         ("ratio", "ratio", ".2f"), ("max_abs_diff", "max|img diff|", ".2e"), ("agree", "agree", "s")],
                  title=f"chaintune.sample vs diffusers DDIMPipeline (median of {args.reps}, alternating)"))
    print(f"\ntotal {result['seconds']:.0f}s")
    return result


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 1, figsize=(5, 3.6))
    rows = result["rows"]
    x = range(len(rows))
    axes.bar([i - 0.2 for i in x], [r["chaintune_s"] for r in rows], 0.4, label="chaintune.sample")
    axes.bar([i + 0.2 for i in x], [r["diffusers_s"] for r in rows], 0.4, label="diffusers DDIMPipeline")
    for i, r in enumerate(rows):
        axes.scatter([i - 0.2] * len(r["chaintune_all_s"]), r["chaintune_all_s"], color="k", s=6, zorder=3)
        axes.scatter([i + 0.2] * len(r["diffusers_all_s"]), r["diffusers_all_s"], color="k", s=6, zorder=3)
    axes.set_xticks(list(x), [f"eta={r['eta']:g}\nratio {r['ratio']:.2f}" for r in rows])
    axes.set(ylabel="seconds", title=f"{result['config']['n']} samples, {result['config']['steps']} steps")
    axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
