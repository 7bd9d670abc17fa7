"""Comparing two sets of gradients at float tolerance: what ``--compile`` and the per-sample gathering of DDPO's
first epoch check before they are trusted."""

from __future__ import annotations

import torch

__all__ = ["gradient_mismatch"]


def gradient_mismatch(eager: dict[str, torch.Tensor], other: dict[str, torch.Tensor], rtol: float,
                      atol_share: float = 1e-5) -> tuple[str, float] | None:
    """The worst tensor whose gradient differs: ``||a - b|| > rtol ||a|| + atol_share ||all of a||`` (the
    absolute floor keeps tensors whose exact gradient is ~0, e.g. an attention key's bias, from being judged by
    rounding alone). Returns ``(name, relative error)`` or None when all agree."""
    total = torch.sqrt(sum(g.double().square().sum() for g in eager.values()))
    worst = None
    for name, a in eager.items():
        err = (a.double() - other[name].double()).norm()
        if err > rtol * a.double().norm() + atol_share * total:
            rel = float(err / a.double().norm().clamp_min(1e-30))
            if worst is None or rel > worst[1]:
                worst = (name, rel)
    return worst
