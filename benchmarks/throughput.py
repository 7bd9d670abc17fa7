"""The align step's achieved throughput as a fraction of this machine's matmul peak (issue 25).

The peak: the best fp32 ``torch.mm`` rate over square sizes 256-2048 on one thread (what one chaintune process
uses on a CPU). The step: one gradient estimate of align's default estimator (RLR, h = 1, 4 spans, checkpointing)
on ``builtin:digits`` at batch 32 and T = 20, its floating-point operations counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward) and its time the
median of ``--reps``. Prints a table, writes ``throughput.json`` and ``throughput.png``.

    python benchmarks/throughput.py
    PYTHONPATH=OLD_CHECKOUT python benchmarks/throughput.py --out /tmp/before   # the same on older code
    python benchmarks/throughput.py --quick
"""

from __future__ import annotations

import statistics
import time

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]


def matmul_peak(sizes=(256, 512, 1024, 2048), reps: int = 3) -> dict:
    import torch

    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t)
        best[n] = 2 * n**3 / min(ts) / 1e9
    return {"gflops_by_size": best, "peak_gflops": max(best.values())}


def main(argv=None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    C.setup_threads(1)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import chaintune
    from chaintune.estimators import get_estimator

    batch, steps = (8, 4) if args.quick else (32, 20)
    peak = matmul_peak(sizes=(256, 512) if args.quick else (256, 512, 1024, 2048))
    model = chaintune.load("builtin:digits", device="cpu")
    model.denoiser.requires_grad_(True)
    est = get_estimator("rlr")

    def step(seed: int) -> None:
        chaintune.estimate_gradient(model, "digit:5", est, n=batch, steps=steps, checkpoint=True,
                                    generator=torch.Generator().manual_seed(seed))

    step(0)
    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = counter.get_total_flops()
    times = []
    for r in range(args.reps):
        t = time.perf_counter()
        step(r)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    row = {"step_seconds": sec, "step_gflop": flops / 1e9, "achieved_gflops": flops / sec / 1e9,
           "peak_gflops": peak["peak_gflops"], "fraction_of_peak": flops / sec / 1e9 / peak["peak_gflops"]}
    print(C.table([row], [("step_seconds", "RLR step s", ".3f"), ("step_gflop", "GFLOP", ".2f"),
                          ("achieved_gflops", "GFLOP/s", ".2f"), ("peak_gflops", "mm peak GFLOP/s", ".1f"),
                          ("fraction_of_peak", "fraction", ".3f")],
                  title=f"builtin:digits, align's RLR defaults, batch {batch}, T = {steps}, one thread"))
    result = {"config": {"batch": batch, "steps": steps, "reps": args.reps}, "machine": C.machine(),
              "peak": peak, **row, "times": times}
    out = C.out_dir(args)
    C.write_json(out / "throughput.json", result)
    C.bar_chart(out / "throughput.png", ["mm peak", "RLR step"], [row["peak_gflops"], row["achieved_gflops"]],
                "GFLOP/s (one thread)", size=(4, 3))
    return result


if __name__ == "__main__":
    main()
