"""Optimizer construction: AdamW, or bitsandbytes' 8-bit AdamW when asked for and usable.

8-bit AdamW keeps the two moment buffers in blockwise-quantised 8 bit (2 bytes/parameter instead of
8), which matters for full fine-tuning of SD-sized UNets on one 24 GB GPU; for LoRA the states are
tiny either way. bitsandbytes needs CUDA for its 8-bit kernels, so on CPU (or when it is not
installed) we fall back to torch's AdamW with a warning instead of failing a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

__all__ = ["make_optimizer", "eight_bit_available"]


def eight_bit_available(params: list[torch.nn.Parameter] | None = None) -> tuple[bool, str]:
    """(usable, reason): bitsandbytes importable and the parameters live on a CUDA device."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA setup raising at import
        return False, f"bitsandbytes is not importable ({type(e).__name__}: {e})"
    if params and not all(p.is_cuda for p in params):
        return False, "bitsandbytes' 8-bit optimizers need the parameters on a CUDA device"
    return True, ""


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                   eight_bit: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over ``params``; ``eight_bit=True`` uses ``bitsandbytes.optim.AdamW8bit`` when usable and
    otherwise warns and falls back to ``torch.optim.AdamW`` (same hyper-parameters)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters to optimize")
    if eight_bit:
        ok, why = eight_bit_available(params)
        if ok:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        warnings.warn(f"8-bit AdamW requested but {why}; using torch.optim.AdamW (32-bit states)",
                      RuntimeWarning, stacklevel=2)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
