"""Memory planner: measure one half-order step and one zeroth-order step, then choose h (paper Sec. 6).

    h* = min( floor((B - B_z (T - 1)) / (B_h - B_z)),  floor(T V_z / (2 (V_z - V_h)) - 1) )

B is the budget left for the chain after the fixed cost (weights, trainable copies, optimizer
state). B_h is the memory one step adds when it keeps its graph (activations saved for backward),
B_z what a zeroth-order step keeps (its latents, mean and noise, stored for the estimate). On CUDA
both are measured with the allocator's peak; on CPU, B_h is the exact byte count of tensors saved
for backward (``saved_tensors_hooks``) and B_z the bytes stored per step. The variance bound is
applied only when variances are given (``benchmarks/estimators.py`` measures them); otherwise
memory decides, as the paper notes it does in practice.

:func:`measure_peak` is the one memory probe: the planner measures a tracked step with it and
``benchmarks/scale.py`` a whole ``chaintune.estimate_gradient`` on the real SD/SDXL/FLUX/Wan/DiT
denoisers, so a plan and the benchmark's table are the same kind of number.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shlex
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

import chaintune
from chaintune.adapters import apply_peft
from chaintune.align.config import AlignConfig
from chaintune.errors import ChaintuneError
from chaintune.options import flat_values
from chaintune.sampling import initial_noise
from chaintune.utils.devices import format_bytes

_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or (m.group(2).lower() or "b") not in _UNITS:
        raise ChaintuneError(f"cannot read memory budget {text!r}; write e.g. 24GB or 512MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2).lower() or "b")])


@dataclass
class MemoryPlan:
    device: str
    budget: int
    fixed: int
    b_h: int
    b_z: int
    steps: int
    batch_size: int
    h_star: int
    fits: bool
    max_batch_h2: int
    checkpointing: bool
    kind: str = ""
    trainable: int = 0
    model: str = "builtin:digits"
    peft: str = "lora"
    requested_device: str | None = None  # the --device planned for (None: the best available, align's default)



def _rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) * 1024
    return 0


def _measure_cuda(fn: Callable[[], dict | None]) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    try:
        out = fn() or {}
    except torch.cuda.OutOfMemoryError as e:
        return {"error": f"OutOfMemoryError: {str(e).splitlines()[0]}", "oom": True}
    torch.cuda.synchronize()
    res = {"seconds": time.perf_counter() - t0, **out}
    res["peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)
    return res


def _map_code_pages() -> None:
    """Map the file-backed pages (shared libraries) into this forked child's page tables up front.

    fork() does not copy page-table entries of file mappings, so the first run of any code path in a child
    faults libtorch's pages in and its RSS grows by tens of MB that are shared page cache, not memory the
    work needs. ``MADV_POPULATE_READ`` (Linux >= 5.14) maps them before the high-water mark is reset.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    for ln in maps:
        parts = ln.split()
        if len(parts) < 6 or not parts[5].startswith("/") or "r" not in parts[1]:
            continue
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 22)  # MADV_POPULATE_READ; fails harmlessly


def _trim_heap() -> None:
    """Return glibc's free heap pages to the OS (``malloc_trim(0)``); a no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _child(fn: Callable[[], dict | None], wfd: int) -> None:
    """Forked child: reset the RSS high-water mark, run ``fn``, report ``ru_maxrss - RSS before``."""
    import gc

    res: dict = {}
    try:
        # OpenMP's thread pool does not survive fork(): a parallel region in the child would wait forever on
        # the parent's workers, so the child computes on one thread (its time is then a one-core time)
        torch.set_num_threads(1)
        _map_code_pages()
        gc.collect()
        _trim_heap()  # free heap pages inherited from the parent would otherwise be reused without raising RSS
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            res["hwm_reset"] = True
        except OSError:
            res["hwm_reset"] = False
        before = _rss_bytes()
        t0 = time.perf_counter()
        out = fn() or {}
        res["seconds"] = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res.update(out)
        res["rss_before_bytes"] = before
        res["peak_bytes"] = int(peak - before)
    except BaseException as e:  # noqa: BLE001 - anything goes back to the parent as a record
        res = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]}
    with os.fdopen(wfd, "w") as f:
        f.write(json.dumps(res, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
    os._exit(0)


def measure_peak(fn: Callable[[], dict | None], device: str | torch.device = "cpu", timeout: float | None = None,
                 max_bytes: int | None = None) -> dict:
    """Peak extra memory (``peak_bytes``) and wall time (``seconds``) of one call of ``fn``, plus ``fn``'s dict.

    CUDA: the allocator's peak above what was allocated before, in this process. CPU: ``fn`` runs in a
    forked child (it shares the loaded model, so only what ``fn`` adds counts) that resets its RSS
    high-water mark (``/proc/self/clear_refs``) and reports ``ru_maxrss`` minus its RSS before: graph
    activations, saved tensors, gradients, parameter copies; a fresh child per call keeps measurements
    independent. The parent kills a child that runs past ``timeout`` seconds or whose RSS grows more than
    ``max_bytes`` (``{"error": ..., "timed_out"/"over_memory": True}``): a configuration that does not fit
    is recorded, not allowed to push the machine into swap or the OOM killer. Errors come back as
    ``{"error": ...}``.
    """
    if torch.device(device).type == "cuda":
        return _measure_cuda(fn)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(rfd)
        _child(fn, wfd)
    os.close(wfd)
    t0, base, chunks, killed = time.monotonic(), None, [], {}
    while True:
        ready, _, _ = select.select([rfd], [], [], 0.25)
        if ready:
            data = os.read(rfd, 1 << 16)
            if not data:
                break
            chunks.append(data)
            continue
        try:
            rss = _rss_bytes(pid)
        except OSError:
            rss = 0
        base = rss if base is None else base
        if timeout is not None and time.monotonic() - t0 > timeout:
            killed = {"error": f"timed out after {timeout:.0f} s", "timed_out": True}
        elif max_bytes is not None and rss - base > max_bytes:
            killed = {"error": f"over the memory cap ({format_bytes(max_bytes)} above the model)", "over_memory": True}
        if killed:
            os.kill(pid, signal.SIGKILL)
            break
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if killed:
        return {**killed, "seconds": time.monotonic() - t0}
    if not chunks:
        return {"error": f"child died without a result (wait status {status}; killed for memory?)"}
    return json.loads(b"".join(chunks))


def measure_step(model, batch_size: int, checkpoint: bool, timeout: float | None = None) -> tuple[int, int]:
    """(B_h, B_z) in bytes for one chain step of ``batch_size`` samples.

    B_h is what a tracked step holds until backward: the larger of its saved-tensor bytes (exact, via
    ``saved_tensors_hooks``) and the peak :func:`measure_peak` sees (which adds the step's transient
    activations), plus the latents a step keeps. B_z: latents, mean and noise kept per step.
    """

    cond = model.default_conditions(batch_size)
    x = initial_noise(model, batch_size)
    t = torch.tensor(int(model.scheduler.config.num_train_timesteps) // 2, device=x.device)
    fn = model.denoise_fn(cond)
    latent_bytes = x.numel() * x.element_size()
    b_z = 3 * latent_bytes  # latents, mean and noise kept per step

    # weights are saved for backward too (a layer's input gradient needs them) but they are not memory a step adds
    weights = {t.untyped_storage().data_ptr() for m in model.modules().values()
               for t in (*m.parameters(), *m.buffers())}

    def tracked_step() -> dict:
        saved = [0]

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        xx = x.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tt: tt):
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(fn, xx, t, use_reentrant=False)
            else:
                out = fn(xx, t)
        return {"saved_bytes": saved[0] + out.numel() * out.element_size()}

    tracked_step()  # warm-up here, so the child measures the step and not lazy initialisation
    res = measure_peak(tracked_step, x.device, timeout=timeout)
    if "error" in res:
        raise ChaintuneError(f"could not measure one tracked step of {model.source or model.kind}: {res['error']}")
    b_h = max(int(res["peak_bytes"]), int(res["saved_bytes"])) + b_z
    return max(b_h, b_z + 1), b_z


def h_star(budget_left: int, b_h: int, b_z: int, steps: int, v_h: float | None = None,
           v_z: float | None = None) -> int:
    mem = (budget_left - b_z * (steps - 1)) // max(1, b_h - b_z)
    h = int(mem)
    if v_h is not None and v_z is not None and v_z > v_h:
        h = min(h, int(steps * v_z / (2 * (v_z - v_h)) - 1))
    return max(0, min(h, steps - 1))


def fixed_cost(model, budget_b: int) -> int:
    """What a run holds whatever the estimator: the weights, plus gradients, two Adam moments and one perturbation
    copy of the trainable ones; one input error when ``budget_b`` is not above it."""
    weights = sum(p.numel() * p.element_size() for m in model.modules().values() for p in m.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.denoiser.parameters() if p.requires_grad)
    fixed = weights + 4 * trainable
    if budget_b <= fixed:
        raise ChaintuneError(f"memory budget {format_bytes(budget_b)} is below the model's fixed cost "
                             f"{format_bytes(fixed)} (weights + optimizer state); use --peft lora or a larger budget")
    return fixed


def plan_memory(model_id: str, budget: str | int, sample_steps: int = 50, batch_size: int = 1, peft: str = "lora",
                device: str | None = None, v_h: float | None = None, v_z: float | None = None) -> MemoryPlan:

    for flag, value, least in (("--batch-size", batch_size, 1), ("--sample-steps", sample_steps, 2)):
        if value < least:  # checked before the model loads; 0 samples would fail deep inside the measurement
            raise ChaintuneError(f"{flag} must be >= {least}, got {value}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget_b = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    model = chaintune.load(model_id, device=dev)
    apply_peft(model.denoiser, peft)
    fixed = fixed_cost(model, budget_b)
    trainable = sum(p.numel() * p.element_size() for p in model.denoiser.parameters() if p.requires_grad)
    left = budget_b - fixed
    # without checkpointing first (faster); with it when that is what makes h = 2 (or the batch) fit
    ckpt = False
    b_h, b_z = measure_step(model, batch_size, checkpoint=False)
    h = h_star(left, b_h, b_z, sample_steps, v_h, v_z)
    if h < min(2, sample_steps - 1) or max_batch(left, b_h, b_z, sample_steps, batch_size) < batch_size:
        cb_h, cb_z = measure_step(model, batch_size, checkpoint=True)
        ch = h_star(left, cb_h, cb_z, sample_steps, v_h, v_z)
        if ch > h:
            ckpt, b_h, b_z, h = True, cb_h, cb_z, ch
    return MemoryPlan(device=dev, budget=budget_b, fixed=fixed, b_h=b_h, b_z=b_z, steps=sample_steps,
                      batch_size=batch_size, h_star=h, fits=h >= 1,
                      max_batch_h2=max_batch(left, b_h, b_z, sample_steps, batch_size),
                      checkpointing=ckpt, kind=getattr(model, "kind", ""), trainable=trainable, model=str(model_id),
                      peft=peft, requested_device=device)


def max_batch(left: int, b_h: int, b_z: int, steps: int, batch_size: int, h: int = 2) -> int:
    """Largest batch whose RLR chain (h tracked steps, the rest zeroth-order) fits in ``left`` bytes;
    B_h and B_z were measured at ``batch_size`` and scale linearly with it."""
    per_sample = (min(h, steps) * b_h + max(0, steps - h) * b_z) / batch_size
    return int(left // per_sample) if per_sample > 0 else 0


def suggested_flags(p: MemoryPlan) -> list[str]:
    """``chaintune align`` flags that run the configuration this plan measured, at the h it reports: the estimator
    and h, and every measured option (model, T, batch, PEFT method, checkpointing, device) whose value differs
    from align's default, so that pasted into align they give the run whose memory was measured."""

    defaults = flat_values(AlignConfig())
    measured = {"model": p.model, "estimator": "rlr", "h": p.h_star, "sample_steps": p.steps,
                "batch_size": p.batch_size, "peft": p.peft, "gradient_checkpointing": p.checkpointing,
                "device": p.requested_device}
    flags: list[str] = []
    for name, value in measured.items():
        if value is None or (name not in ("estimator", "h") and value == defaults[name]):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def format_plan(p: MemoryPlan) -> str:
    lines = [
        f"model                {p.kind or '?'}   trainable {format_bytes(p.trainable)}",
        f"device               {p.device}",
        f"budget               {format_bytes(p.budget)}",
        f"fixed (weights+opt)  {format_bytes(p.fixed)}",
        f"B_h (one HO step)    {format_bytes(p.b_h)}   batch {p.batch_size}",
        f"B_z (one ZO step)    {format_bytes(p.b_z)}",
        f"T                    {p.steps}",
        f"gradient ckpt        {'yes' if p.checkpointing else 'no'}",
        f"h*                   {p.h_star}" + ("" if p.fits else "   (does not fit: lower batch or steps)"),
        f"max batch at h=2     {p.max_batch_h2}",
        f"suggested flags      {shlex.join(suggested_flags(p))}",
    ]
    if not p.fits:
        raise ChaintuneError("memory budget too small for even one half-order step:\n" + "\n".join(lines))
    return "\n".join(lines)
