"""``--compile`` on a built-in model: compile time, step time and whether the gradients stay eager's (issue 25).

Each mode runs in fresh processes (one thread; ``--rounds`` of them in ABBA order, so a changing load hits every
mode alike; compile caches off, so the first call is a cold compile as a user's first run sees it): the model's
guided denoiser closure at batch 32 and a mid-chain
timestep, one warm-up call (where the compile happens, timed), then ``--reps`` timed forward+backward passes and
no-grad forward passes (min and median). Every mode's gradient is compared with eager's on the same input
(chaintune.run.compiled.gradient_mismatch: worst tensor and its relative error) — what ``--compile`` checks before a
run. Modes: eager; inductor; inductor with ``max_fusion_size = 1`` (no fusion: the setting that makes torch 2.13's
CPU inductor correct on the UNet2DModel); aot_eager (traced, not code-generated). Prints a table, writes
``compile.json`` and ``compile.png``.

    python benchmarks/compile.py                       # builtin:digits, ~10 min on 2 cores (3 compiles)
    python benchmarks/compile.py --model builtin:moving-digits --modes eager,inductor
    python benchmarks/compile.py --quick               # CI smoke: eager and aot_eager, batch 4
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]

MODES = ("eager", "inductor", "inductor-nofuse", "aot_eager")


def parse_args(argv=None):
    p = C.parser(__doc__)
    p.add_argument("--model", default="builtin:digits")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2, help="each mode's process this many times, in ABBA order")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=__import__("argparse").SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.modes, a.batch, a.reps, a.rounds = "eager,aot_eager", 4, 2, 1
    return a


def worker(args, mode: str, out: Path) -> None:
    """One mode in this process: times and the gradient (saved for the parent to compare with eager's)."""
    C.setup_threads(1)
    import torch
    import torch._inductor.config as inductor_config

    import chaintune
    from chaintune.chain import prepare_scheduler

    if mode == "inductor-nofuse":
        inductor_config.max_fusion_size = 1
    model = chaintune.load(args.model, device="cpu")
    model.denoiser.requires_grad_(True).eval()
    gen = torch.Generator().manual_seed(0)
    cond = model.default_conditions(args.batch, gen)
    x = torch.randn(args.batch, *model.latent_shape, generator=gen)
    t = prepare_scheduler(model.scheduler, 10).timesteps[5]
    w = None
    if mode != "eager":
        model.denoiser.compile(backend="aot_eager" if mode == "aot_eager" else "inductor")
    params = [(k, p) for k, p in model.denoiser.named_parameters()]
    fn = model.denoise_fn(cond)

    def step():
        nonlocal w
        out = fn(x, t)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if w is None else w
        return torch.autograd.grad((out * w).sum(), [p for _, p in params], allow_unused=True)

    def forward():
        with torch.no_grad():
            fn(x, t)

    t0 = time.perf_counter()
    grads = step()
    forward()
    first = time.perf_counter() - t0
    times = {"step": [], "forward": []}
    for _ in range(args.reps):
        for name, f in (("step", step), ("forward", forward)):
            a = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - a)
    torch.save({k: (g if g is not None else torch.zeros_like(p)).detach()
                for (k, p), g in zip(params, grads, strict=True)}, out.with_suffix(".pt"))
    out.write_text(json.dumps({"mode": mode, "first_call_s": first, **times}))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args, args.worker[0], Path(args.worker[1]))
        return {}
    import tempfile

    import torch

    from chaintune.run.compiled import gradient_mismatch

    modes = [m for m in args.modes.split(",") if m]
    if "eager" not in modes:
        modes.insert(0, "eager")
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    got: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for mode in (modes if k % 2 == 0 else modes[::-1]):
                out = Path(tmp) / f"{mode}-{k}.json"
                cmd = [sys.executable, __file__, "--worker", mode, str(out), "--model", args.model, "--batch",
                       str(args.batch), "--reps", str(args.reps)]
                C.log(f"  [compile] {mode} (round {k + 1}) ...")
                subprocess.run(cmd, check=True, env=env)
                r = json.loads(out.read_text())
                if mode not in got:
                    got[mode] = {"mode": mode, "first_call_s": [], "step": [], "forward": [],
                                 "grads": torch.load(out.with_suffix(".pt"))}
                got[mode]["first_call_s"].append(r["first_call_s"])
                got[mode]["step"] += r["step"]
                got[mode]["forward"] += r["forward"]
    rows = [got[m] for m in modes]
    eager = rows[0]["grads"]
    for r in rows:
        bad = gradient_mismatch(eager, r.pop("grads"), rtol=1e-3)
        r.update(first_call_s=statistics.median(r["first_call_s"]), step_min_ms=1e3 * min(r["step"]),
                 step_median_ms=1e3 * statistics.median(r["step"]), forward_min_ms=1e3 * min(r["forward"]),
                 forward_median_ms=1e3 * statistics.median(r["forward"]),
                 gradients="agree" if bad is None else f"differ: {bad[0]} rel {bad[1]:.2g}")
    base = rows[0]["step_median_ms"]
    for r in rows:
        r["step_vs_eager"] = r["step_median_ms"] / base
    print(C.table(rows, [("mode", "mode", "s"), ("first_call_s", "first call s", ".1f"),
                         ("step_min_ms", "fwd+bwd min ms", ".1f"), ("step_median_ms", "median", ".1f"),
                         ("forward_median_ms", "fwd median ms", ".1f"), ("step_vs_eager", "step / eager", ".2f"),
                         ("gradients", "gradients vs eager", "s")],
                  title=f"{args.model}, batch {args.batch}, one thread, {args.rounds} processes x {args.reps} reps"))
    result = {"config": {"model": args.model, "batch": args.batch, "reps": args.reps, "rounds": args.rounds,
                         "modes": modes},
              "machine": C.machine(), "torch": torch.__version__, "rows": rows}
    out_dir = C.out_dir(args)
    C.write_json(out_dir / "compile.json", result)
    C.bar_chart(out_dir / "compile.png", [r["mode"] for r in rows], [r["step_median_ms"] for r in rows],
                "forward+backward ms (median)", title="red: gradients differ from eager",
                colors=["C0" if r["gradients"] == "agree" else "C3" for r in rows])
    return result


if __name__ == "__main__":
    main()
