"""Timestep distributions of Diff-Tuning: psi for the target data, xi for the knowledge bank.

Why: the chain of forgetting says a pretrained denoiser stays good near t = 0 and must be
relearned near t = T. So target (reconsolidation) losses are drawn more often at large t,
psi(t) ∝ (t + 1)^alpha, and bank (retention) losses more often at small t, xi(t) ∝ (T - t)^beta.
Either importance-sample t from these laws, or sample t uniformly and weight each loss by
T * p(t) — both have the same expectation, E_uniform[T p(t) L(t)] = E_p[L(t)].
"""

from __future__ import annotations

import torch

KINDS = ("uniform", "psi", "xi")


def timestep_probs(num_timesteps: int, kind: str, power: float = 1.0) -> torch.Tensor:
    """P(t = i) for i = 0 .. T-1 as a float64 vector summing to 1."""
    i = torch.arange(num_timesteps, dtype=torch.float64)
    if kind == "uniform":
        w = torch.ones_like(i)
    elif kind == "psi":
        w = (i + 1) ** power
    elif kind == "xi":
        w = (num_timesteps - i) ** power
    else:
        raise ValueError(f"unknown timestep distribution {kind!r}; choose one of {KINDS}")
    return w / w.sum()


def sample_timesteps(n: int, num_timesteps: int, kind: str = "uniform", power: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` integer timesteps (LongTensor) from ``kind`` (uniform, psi or xi)."""
    if kind == "uniform":
        return torch.randint(0, num_timesteps, (n,), generator=generator)
    probs = timestep_probs(num_timesteps, kind, power)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def importance_weights(t: torch.Tensor, num_timesteps: int, kind: str, power: float = 1.0) -> torch.Tensor:
    """Per-sample weights T * p(t) that turn a uniform-t loss into an expectation under ``kind``."""
    probs = timestep_probs(num_timesteps, kind, power).to(torch.float32)
    return probs.to(t.device)[t] * num_timesteps
