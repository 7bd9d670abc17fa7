"""Devices: the one check of a ``--device`` a user asked for, and how much memory is free on one."""

from __future__ import annotations

import os

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
