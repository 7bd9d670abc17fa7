"""How many CPU threads torch should use for a model: :func:`choose_threads`, :func:`apply_thread_policy`.

torch defaults to one intra-op thread per core, and a thread that has to wait for a core someone else is
using stalls every op of the others. ``benchmarks/threads.py`` (``benchmarks/results/threads.json``) timed
1 vs 2 threads on a 2-core box for sampling builtin:digits (1.1M parameters, 64 images x 20 steps) and a
forward+backward of a 1.6M and a 24M-parameter UNet at 32x32:

* quiet machine: 2 threads 1.3x (sampling), 1.6x (1.6M) and 1.7x (24M) faster than 1;
* one core busy (a spinning process): 2 threads 2.0x, 1.9x and 1.5x *slower*;
* other jobs running (load average ~4): 2 threads 6.5x, 5x and 4x (idle phase) up to 8x slower.

A second thread gains at most ~1.7x and can cost 2-8x. The rule takes no risk where the gain is smallest
(small models: every model chaintune ships, and what tests and CI run) and, for big models, uses the cores
that are free when the run starts:

* fewer than :data:`ALL_CORES_FROM` (10M) parameters: one thread;
* otherwise one thread per core that is not already busy: the cores available to this process minus the
  cores the rest of the machine is using (CPU time over a quarter of a second, rounded), at least 1.

``CHAINTUNE_THREADS=N`` overrides the rule (``auto`` or empty: the rule), for N up to the CPUs this process may
use; a larger N is refused rather than clamped: it is a setting meant for another machine, and running more
threads than cores is what the rule exists to avoid (and torch crashes on absurd counts, 100000 segfaults). GPU
models keep torch's default, since the CPU then only feeds the device.
"""

from __future__ import annotations

import math
import os

from chaintune.errors import ChaintuneError

# below this many parameters: one thread (benchmarks/threads.py: at 1.1M/1.6M a 2nd thread gains <= 1.6x on
# a quiet 2-core box but loses 2x with one core busy and 5-8x under other jobs)
ALL_CORES_FROM = 10_000_000
ENV = "CHAINTUNE_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup (container) CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def _busy_cores(window: float = 0.25) -> int:
    """Cores the rest of the machine keeps busy now: the non-idle share of all CPU time over ``window``
    seconds (this process sleeps meanwhile) times the host's cores; the 1-minute load average where
    ``/proc/stat`` is missing (it lags by up to a minute); 0 where neither exists."""
    import time

    try:
        a = _cpu_times()
        time.sleep(window)
        b = _cpu_times()
        total = sum(b) - sum(a)
        idle = (b[3] + b[4]) - (a[3] + a[4])  # idle + iowait
        if total > 0:
            return round((1 - idle / total) * (os.cpu_count() or 1))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows: assume a quiet machine
        return 0


def choose_threads(num_parameters: int) -> int:
    """The thread count the rule above gives for a model of ``num_parameters`` on this machine now."""
    if num_parameters < ALL_CORES_FROM:
        return 1
    cpus = available_cpus()
    # /proc/stat and the load average describe the whole host (also inside a container): compare with the
    # host's cores, then cap by ours
    free = (os.cpu_count() or cpus) - _busy_cores()
    return max(1, min(cpus, free))


def threads_from_env() -> int | None:
    """``CHAINTUNE_THREADS`` as a positive int, at most :func:`available_cpus`; None when unset, empty or ``auto``.

    An error, not a clamp with a warning, when it asks for more threads than CPUs: the variable is an explicit
    order, and obeying a different number than the one given would hide that it was set for another machine."""
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in ("", "auto"):
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ChaintuneError(f"{ENV} must be a positive number of threads or 'auto', got {raw[:40]!r}")
    cpus = available_cpus()
    if n > cpus:
        raise ChaintuneError(f"{ENV}={n} asks for more threads than the {cpus} CPU(s) this process may use; set it "
                             f"to at most {cpus}, or to 'auto'")
    return n


def _count_parameters(model) -> tuple[int, bool]:
    """(parameters, on the CPU) of an ``nn.Module`` or a chaintune model (its denoiser)."""
    net = getattr(model, "denoiser", model)
    params = list(net.parameters()) if hasattr(net, "parameters") else []
    on_cpu = all(p.device.type == "cpu" for p in params)
    return sum(p.numel() for p in params), on_cpu


def apply_thread_policy(model_or_num_parameters) -> int:
    """Set torch's intra-op thread count for this model; return the count in effect.

    Accepts a parameter count, an ``nn.Module`` or a chaintune model. ``CHAINTUNE_THREADS`` wins when set;
    a model on a GPU keeps torch's current setting.
    """
    import torch

    forced = threads_from_env()
    if forced is not None:
        n = forced
    elif isinstance(model_or_num_parameters, int):
        n = choose_threads(model_or_num_parameters)
    else:
        count, on_cpu = _count_parameters(model_or_num_parameters)
        if not on_cpu:
            return torch.get_num_threads()
        n = choose_threads(count)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
