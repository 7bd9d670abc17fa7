"""Devices: the one check of a ``--device`` a user asked for, and how much memory is free on one."""

from __future__ import annotations

import os
import re

import torch

from chaintune.errors import ChaintuneError


def check_device(requested: str | None) -> torch.device | None:
    """The device asked for, checked now (a missing GPU is the user's to hear about, not a silent CPU run); None
    when none was asked for (the caller's default: the best available)."""
    if requested is None:
        return None
    try:
        dev = torch.device(requested)
    except RuntimeError as e:
        raise ChaintuneError(f"--device {requested!r} is not a device (cpu, cuda, cuda:1, mps ...): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ChaintuneError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ChaintuneError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ChaintuneError(f"--device {requested}: MPS is not available on this machine")
    return dev


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_bytes(device: str | torch.device) -> int | None:
    """Bytes free on ``device``: the GPU's free memory, or the host's MemAvailable; None where unknown."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def format_bytes(b: float) -> str:
    """``12.3 MB``: bytes in the largest unit below 1024 (binary units, as the planners report them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1024 or unit == "TB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"


_OOM = re.compile(r"(can't allocate memory|CUDA out of memory|out of memory|not enough memory)", re.IGNORECASE)


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is the allocator failing (CPU ``DefaultCPUAllocator``, CUDA, MPS), not a bug."""
    return isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
        isinstance(e, RuntimeError) and bool(_OOM.search(str(e))))


def _requested_bytes(message: str) -> int | None:
    """The allocation that failed, as the allocator reports it ("tried to allocate 1099511627776 bytes",
    "Tried to allocate 20.00 GiB")."""
    m = re.search(r"allocate ([0-9.]+)\s*(bytes|[KMGT]i?B)", message, re.IGNORECASE)
    if not m:
        return None
    unit = m.group(2).lower()
    return int(float(m.group(1)) * (1 if unit == "bytes" else _UNITS.get(unit, 1)))


def out_of_memory_error(e: BaseException, batch_size: int, grad_accum: int, device: torch.device,
                        step: int) -> ChaintuneError:
    """The user's error for a step that ran out of memory: how much the failed allocation asked for, what is free,
    and a batch that should fit (memory grows about linearly with the micro-batch, so the batch is scaled by what
    is free over what was needed), with the same samples per step through --grad-accum."""
    need, free = _requested_bytes(str(e)), free_bytes(device)
    asked = f"an allocation of {format_bytes(need)}" if need else "an allocation"
    have = f" with {format_bytes(free)} free" if free is not None else ""
    fit = max(1, int(batch_size * free / (free + need))) if need and free is not None else max(1, batch_size // 2)
    fit = min(fit, batch_size - 1) if batch_size > 1 else 1
    accum = -(-batch_size * grad_accum // fit)
    how = (f"lower --batch-size below about {fit} (what this one allocation leaves room for; a step holds several "
           f"such tensors) and raise --grad-accum (e.g. {accum}) to keep {batch_size * grad_accum} samples per step"
           if batch_size > 1 else "use --peft lora, --gradient-checkpointing or a shorter --sample-steps")
    return ChaintuneError(f"step {step + 1} ran out of memory on {device.type}: {asked} failed{have} at --batch-size "
                          f"{batch_size}; {how}; `chaintune plan --batch-size N` measures what one step needs")
