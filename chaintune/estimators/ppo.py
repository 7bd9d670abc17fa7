"""PPO pieces shared by ``reinforce`` (DDPO), ``grpo`` (Flow-GRPO) and ``rlr-released``.

The references' convention, followed here: the Gaussian log-prob of a transition is **averaged**
over the D latent dimensions (ddpo-pytorch ``ddim_step_with_logprob``, Flow-GRPO
``sde_step_with_logprob``: ``log_prob.mean(dim=tuple(range(1, ndim)))``), and the PPO ratio is

    rho = exp(lp_mean_new - lp_mean_old),   loss_t = mean_k max(-A_k rho_k, -A_k clip(rho_k, 1 - eps, 1 + eps)),

so ``clip_range`` (eps, 1e-4 in both) bounds the change of the *per-dimension* log-density. On a
summed log-prob the same eps would be D times tighter (a parameter step that moves
lp_mean by 1e-4 moves lp_sum by D * 1e-4, and nearly every sample is clipped after the first
update of an epoch).

Scale: at rho = 1, grad loss_t = -mean_k A_k grad lp_mean = -(1/D) mean_k A_k grad lp_sum, i.e. the
references' step is D times smaller than the likelihood-ratio gradient of E[R]. chaintune's
estimators all accumulate an estimate of -grad E[R] (so that the KL guard's weight, RLR's
first-order term and gradient clipping see one scale), so the estimators backpropagate
``D * loss_t``: the first-epoch gradient is exactly the unbiased sum-form one, while the clipping
decisions (and ``clip_frac``) are the references'. With Adam a constant factor on the whole
gradient does not change the update; what it changes is the balance against other terms,
which therefore keep their meaning (Flow-GRPO's ``beta`` multiplies a per-dimension KL, the
same factor D turns it into the summed KL used here, so ``kl_coef`` = ``beta``).
"""

from __future__ import annotations

import math

import torch

from chaintune.chain import transition

__all__ = ["mean_log_prob", "step_log_prob", "ppo_objective"]


def mean_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over the non-batch dimensions -> [n] (DDPO's form, in float32 or wider)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x, mean, std = x.to(dt), mean.to(dt), torch.as_tensor(std).to(device=x.device, dtype=dt)
    sq = ((x - mean) ** 2).flatten(1).mean(1)
    return -sq / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def step_log_prob(denoise, sched, x_t: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-dimension mean log p_theta(x_prev | x_t), transition mean, std) with a graph to theta.

    ``t`` is the trajectory's stored timestep (``traj.timesteps[i]``), passed to the denoiser as the
    chain passed it, so that recomputing an unchanged policy reproduces the sampled mean."""
    mean, std, _ = transition(sched, denoise(x_t, t.to(x_t.device)), int(t), x_t, eta)
    return mean_log_prob(x_prev, mean, std), mean, std


def ppo_objective(adv: torch.Tensor, lp: torch.Tensor, old_lp: torch.Tensor, clip_range: float,
                  max_log_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample clipped PPO loss max(-A rho, -A clip(rho, 1-eps, 1+eps)) and the ratio rho.

    ``lp``/``old_lp`` are per-dimension mean log-probs. ``max_log_ratio`` clamps log rho first (the RLR
    release clamps it to +-20 against overflow)."""
    log_ratio = lp - old_lp.to(lp)
    if max_log_ratio is not None:
        log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    adv = adv.to(ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio
