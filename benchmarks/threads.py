"""How many torch threads should chaintune use on a CPU? (the rule in ``chaintune/utils/threads.py``)

For torch intra-op thread counts 1, 2 and ``os.cpu_count()`` this times

* ``sample``: ``chaintune.sample`` of 64 images x 20 steps from builtin:digits (a 1.1M-parameter UNet);
* ``fwd+bwd S``: one forward + backward of a diffusers ``UNet2DModel`` built from a config (random weights)
  at 32x32, batch 4, for a small (1.6M) and a big (24M parameter) UNet;

once on the machine as it is ("idle": nothing started by the benchmark; the load average is recorded) and once
with a background process spinning on one core ("busy": started and stopped by this script, and bounded in
time so it can never outlive it), which is what a shared 2-core box or a second job looks like. Repetitions
alternate the thread counts (median reported) so drifting load hits them alike; a workload stops repeating
once it has used ``--budget`` seconds (oversubscribed runs can be 10x slower), after at least one repetition.

    python benchmarks/threads.py            # up to 3 repetitions (~2 minutes on 2 cores)
    python benchmarks/threads.py --quick    # 1 repetition, sample + small UNet
    python benchmarks/threads.py --demo     # the demo's align step under 4 competing processes, before/after

``--demo`` (issue 22: ``make demo`` took 100-450 s a step on a loaded machine): the RLR run of ``chaintune demo``
(its settings, ``--demo-steps`` optimizer steps) in a fresh process with torch's default thread count (one per
core: "before", what ``chaintune demo`` did until the thread rule reached it) and with the trainers' thread rule
("after", one thread for this 1.1M-parameter model), each quiet and with ``--competitors`` CPU-bound processes
spinning beside it. Reported: the median seconds per optimizer step (the training loop's own clock, evaluations
excluded) and the slowdown against the quiet run of the same setting. Writes ``threads_demo.json``.
"""

from __future__ import annotations

import os

# before torch is imported (``_common`` defaults OMP_NUM_THREADS to 1): let torch see every core
os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
os.environ["MKL_NUM_THREADS"] = str(os.cpu_count() or 1)

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

try:
    from benchmarks import _common as C  # noqa: E402
except ImportError:  # run as a script
    import _common as C  # type: ignore[no-redef]  # noqa: E402

# UNet2DModel configs at 32x32 (3 channels), random weights: (name, block_out_channels)
UNETS = [("small", (32, 64, 64)), ("big", (64, 128, 256, 256))]
_SPIN = "import time\nend = time.time() + {bound}\nwhile time.time() < end:\n    pass\n"


def parse_args(argv: list[str] | None = None):
    p = C.parser(__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget", type=float, default=12.0, help="seconds per workload and load before stopping")
    p.add_argument("--n", type=int, default=64, help="samples drawn from builtin:digits")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the sampling workload")
    p.add_argument("--batch", type=int, default=4, help="batch of the UNet forward+backward")
    p.add_argument("--demo", action="store_true", help="time the demo's align step under competing processes")
    p.add_argument("--competitors", type=int, default=4, help="--demo: CPU-bound processes spinning beside it")
    p.add_argument("--demo-steps", type=int, default=4, help="--demo: optimizer steps per timed run")
    p.add_argument("--demo-timeout", type=float, default=900.0, help="--demo: seconds before a run is stopped")
    a = p.parse_args(argv)
    a.unets = UNETS
    if a.quick:
        a.reps, a.unets, a.budget = 1, UNETS[:1], 5.0
    return a


def unet(block_out_channels):
    from diffusers import UNet2DModel

    k = len(block_out_channels)
    down = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")[:k]
    up = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")[-k:]
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=tuple(block_out_channels), down_block_types=down, up_block_types=up)


def workloads(args):
    """(name, parameters, fn) for each timed workload."""
    import torch

    import chaintune

    digits = chaintune.load("builtin:digits", device="cpu")
    digits.denoiser.eval().requires_grad_(False)
    out = [("sample 64x20 digits", sum(p.numel() for p in digits.denoiser.parameters()),
            lambda: chaintune.sample(digits, args.n, steps=args.steps, eta=1.0,
                                     generator=torch.Generator().manual_seed(0)))]
    g = torch.Generator().manual_seed(0)
    for name, channels in args.unets:
        torch.manual_seed(0)
        net = unet(channels)
        x = torch.randn(args.batch, 3, 32, 32, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)

        def step(net=net, x=x, t=t):
            net.zero_grad(set_to_none=True)
            net(x, t).sample.square().mean().backward()

        out.append((f"fwd+bwd {name} UNet 32x32 b{args.batch}", sum(p.numel() for p in net.parameters()), step))
    return out


def measure(jobs, thread_counts, reps: int, load: str, budget: float) -> list[dict]:
    import torch

    rows = []
    for name, params, fn in jobs:
        times: dict[int, list[float]] = {k: [] for k in thread_counts}
        torch.set_num_threads(1)
        fn()  # warm-up (allocator, oneDNN primitives)
        start = time.perf_counter()
        for r in range(reps):
            if r and time.perf_counter() - start > budget:
                break
            for k in (thread_counts if r % 2 == 0 else thread_counts[::-1]):
                torch.set_num_threads(k)
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times[1])
        for k in thread_counts:
            med = statistics.median(times[k])
            rows.append({"workload": name, "params_m": params / 1e6, "load": load, "threads": k, "seconds": med,
                         "all_s": times[k], "speedup_vs_1": base / med, "loadavg_1m": os.getloadavg()[0]})
            C.log(f"  [{load}] {name} ({params / 1e6:.1f}M)  threads={k}: {med:.3f}s  x{base / med:.2f} vs 1 thread")
    return rows


def choose_rule(rows: list[dict], thread_counts: list[int]) -> dict:
    """What the numbers say: from which model size every core beats one thread on the idle machine (by > 10 %,
    and at every larger size measured), and whether one thread wins at every size once a core is busy."""
    most = max(thread_counts)
    by = {(r["workload"], r["load"], r["threads"]): r for r in rows}
    sizes = sorted({(r["params_m"], r["workload"]) for r in rows})
    idle_ok = [(p, w, by[(w, "idle", most)]["speedup_vs_1"] > 1.1) for p, w in sizes]
    threshold = None
    for i, (params_m, _w, good) in enumerate(idle_ok):
        if good and all(g for _, _, g in idle_ok[i:]):
            threshold = params_m
            break
    busy_one = all(by[(w, "busy", most)]["speedup_vs_1"] < 1.0 for _, w in sizes)
    return {"all_cores_from_params_m": threshold, "busy_prefers_one_thread": busy_one,
            "idle_all_cores_faster": idle_ok, "threads_compared": [1, most]}


_DEMO_RUN = """
import json, sys, tempfile
from pathlib import Path
from chaintune.align.demo import demo_config
from chaintune.align import align_run
steps, policy = int(sys.argv[1]), sys.argv[2] == "rule"
with tempfile.TemporaryDirectory() as tmp:
    cfg = demo_config("rlr", 3, steps, Path(tmp), 0, eval_every=0, eval_samples=8, report=False, progress=False)
    res = align_run(cfg, thread_policy=policy)
    import torch
    print(json.dumps({"times": [r["time"] for r in res.history if "time" in r], "threads": torch.get_num_threads()}))
"""


def demo_under_load(args) -> dict:
    """Seconds per step of the demo's RLR run, torch's default threads vs the thread rule, quiet and loaded."""
    rows = []
    for load in ("quiet", "loaded"):
        spinners = [subprocess.Popen([sys.executable, "-c", _SPIN.format(bound=args.demo_timeout * 2)])
                    for _ in range(args.competitors if load == "loaded" else 0)]
        try:
            time.sleep(1.0 if spinners else 0.0)
            for setting in ("default", "rule"):
                env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
                env.pop("CHAINTUNE_THREADS", None)
                t0 = time.time()
                try:
                    done = subprocess.run([sys.executable, "-c", _DEMO_RUN, str(args.demo_steps), setting], env=env,
                                          capture_output=True, text=True, timeout=args.demo_timeout)
                    got = json.loads(done.stdout.strip().splitlines()[-1])
                    times = got["times"]
                    steps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
                    row = {"load": load, "threads": setting, "torch_threads": got["threads"],
                           "sec_per_step": statistics.median(steps), "steps": steps}
                except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError) as e:
                    row = {"load": load, "threads": setting, "sec_per_step": float("nan"),
                           "error": f"{type(e).__name__} after {time.time() - t0:.0f}s"}
                row.update(competitors=len(spinners), loadavg_1m=os.getloadavg()[0], wall=time.time() - t0)
                rows.append(row)
                C.log(f"  [{load}, {len(spinners)} competitors] {setting}: {row['sec_per_step']:.2f} s/step "
                      f"({row.get('torch_threads', '?')} torch threads)")
        finally:
            for sp in spinners:
                sp.terminate()
                sp.wait(timeout=10)
    quiet = {r["threads"]: r["sec_per_step"] for r in rows if r["load"] == "quiet"}
    for r in rows:
        r["slowdown_vs_quiet"] = r["sec_per_step"] / quiet[r["threads"]]
    result = {"config": {"competitors": args.competitors, "demo_steps": args.demo_steps, "cpus": os.cpu_count()},
              "machine": C.machine(), "rows": rows}
    C.write_json(C.out_dir(args) / "threads_demo.json", result)
    print()
    print(C.table(rows, [("load", "load", "s"), ("threads", "threads", "s"), ("sec_per_step", "s/step", ".2f"),
                         ("slowdown_vs_quiet", "x quiet", ".1f")],
                  title=f"chaintune demo's RLR step, torch's default threads vs the thread rule "
                        f"({args.competitors} competing processes when loaded)"))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.demo:
        return demo_under_load(args)
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    t_start = time.time()
    cpus = os.cpu_count() or 1
    thread_counts = sorted({1, 2, cpus})
    jobs = workloads(args)
    rows = []
    loadavg = {}
    loadavg["idle"] = os.getloadavg()
    C.log(f"idle (load average {loadavg['idle'][0]:.2f}), threads {thread_counts}")
    rows += measure(jobs, thread_counts, args.reps, "idle", args.budget)
    bound = 200 if not args.quick else 60  # the spinner ends by itself even if this script is killed
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN.format(bound=bound)])
    try:
        time.sleep(1.0)
        loadavg["busy"] = os.getloadavg()
        C.log(f"busy: one spinning process (pid {spinner.pid}), load average {loadavg['busy'][0]:.2f}")
        rows += measure(jobs, thread_counts, args.reps, "busy", args.budget)
    finally:
        spinner.terminate()
        spinner.wait(timeout=10)
    rule = choose_rule(rows, thread_counts)
    result = {"config": {"n": args.n, "steps": args.steps, "batch": args.batch, "reps": args.reps,
                         "budget": args.budget, "thread_counts": thread_counts, "quick": args.quick,
                         "unets": args.unets},
              "machine": C.machine(), "loadavg": loadavg, "rows": rows, "rule": rule,
              "seconds": round(time.time() - t_start, 1)}
    out = C.out_dir(args)
    C.write_json(out / "threads.json", result)
    plot(result, out / "threads.png")
    print()
    print(C.table(rows, [("workload", "workload", "s"), ("params_m", "params (M)", ".1f"), ("load", "load", "s"),
                         ("threads", "threads", "d"), ("seconds", "median s", ".3f"),
                         ("speedup_vs_1", "speed-up vs 1 thread", ".2f")],
                  title=f"torch threads on {cpus} CPUs (median of <= {args.reps}, alternating)"))
    th = rule["all_cores_from_params_m"]
    smallest = min(r["params_m"] for r in rows)
    said = ("idle: 1 thread at every size" if th is None else "idle: all cores at every size" if th == smallest
            else f"idle: 1 thread below {th:.1f}M parameters, all cores from there")
    busy = "busy: 1 thread at every size" if rule["busy_prefers_one_thread"] else "busy: more threads help somewhere"
    print(f"\nrule: {said}; {busy} (compared 1 vs {max(thread_counts)} threads)")
    print(f"total {result['seconds']:.0f}s")
    return result


def plot(result: dict, path) -> None:
    plt = C.pyplot()
    rows = result["rows"]
    names = list(dict.fromkeys(r["workload"] for r in rows))
    threads = result["config"]["thread_counts"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for j, load in enumerate(("idle", "busy")):
            sel = {r["threads"]: r for r in rows if r["workload"] == name and r["load"] == load}
            width = 0.8 / len(threads)
            for i, k in enumerate(threads):
                if k in sel:
                    ax.bar(j + (i - (len(threads) - 1) / 2) * width, sel[k]["seconds"], width,
                           color=f"C{i}", label=f"{k} thread{'s' if k > 1 else ''}" if j == 0 else None)
        params = next(r["params_m"] for r in rows if r["workload"] == name)
        ax.set_xticks([0, 1], ["idle", "busy (1 core spinning)"], fontsize=8)
        ax.set_title(f"{name}\n{params:.1f}M params", fontsize=8)
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
