"""The Diff-Tuning objective (Zhong et al., NeurIPS 2024) and plain fine-tuning's, as one function.

    L = mean_target ||target - f(x_t, t, y)||^2            t ~ psi(t) ∝ (t + 1)^alpha
        + lam * mean_bank ||target - f(x^_t, t, null)||^2   t ~ xi(t)  ∝ (T - t)^beta

(``mode='weighting'`` draws t uniformly and weights each loss by T p(t) instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.chain import add_noise, training_target
from chaintune.transfer.conditioning import joint_conditions, null_conditions
from chaintune.transfer.timesteps import importance_weights, sample_timesteps


@dataclass
class LossParts:
    total: torch.Tensor
    recon: torch.Tensor
    retention: torch.Tensor
    t_target: torch.Tensor
    t_bank: torch.Tensor | None


def _per_sample_loss(model: DiffusionModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     cond: Conditions) -> torch.Tensor:
    sched = model.scheduler
    x_t = add_noise(sched, x0, noise, t)
    out = model.model_output(x_t, t, cond)
    target = training_target(sched, x0, noise, t)
    return F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)


def diff_tuning_loss(model: DiffusionModel, target_x0: torch.Tensor, target_cond: Conditions,
                     bank_x0: torch.Tensor | None, *, alpha: float = 1.0, beta: float = 1.0, lam: float = 0.1,
                     mode: str = "sampling", generator: torch.Generator | None = None,
                     t_target: torch.Tensor | None = None, t_bank: torch.Tensor | None = None,
                     noise_target: torch.Tensor | None = None,
                     noise_bank: torch.Tensor | None = None, psi: bool | None = None) -> LossParts:
    """L = mean(recon on target, t ~ psi) + lam * mean(retention on bank, t ~ xi).

    ``bank_x0=None`` drops the retention term; the target's t is then uniform (plain fine-tuning)
    unless ``psi=True`` (Diff-Tuning without a bank). In ``weighting`` mode t is uniform and each
    per-sample loss is multiplied by T p(t). Timesteps and noises may be passed in (tests
    recompute the loss from them).
    """
    T = int(model.scheduler.config.num_train_timesteps)
    dev = target_x0.device
    psi = bank_x0 is not None if psi is None else psi
    if t_target is None:
        kind = "psi" if psi and mode == "sampling" else "uniform"
        t_target = sample_timesteps(len(target_x0), T, kind, alpha, generator)
    t_target = t_target.to(dev)
    if noise_target is None:
        noise_target = torch.randn(target_x0.shape, generator=generator).to(target_x0)
    ret = None
    if bank_x0 is None:
        rec = _per_sample_loss(model, target_x0, t_target, noise_target, target_cond)
    else:
        if t_bank is None:
            kind = "uniform" if mode == "weighting" else "xi"
            t_bank = sample_timesteps(len(bank_x0), T, kind, beta, generator)
        t_bank = t_bank.to(dev)
        if noise_bank is None:
            noise_bank = torch.randn(bank_x0.shape, generator=generator).to(bank_x0)
        joint = joint_conditions(model, target_cond, len(target_x0), len(bank_x0))
        if joint is not None:  # one forward pass for target and bank (same maths, less overhead)
            both = _per_sample_loss(model, torch.cat([target_x0, bank_x0]), torch.cat([t_target, t_bank]),
                                    torch.cat([noise_target, noise_bank]), joint)
            rec, ret = both[: len(target_x0)], both[len(target_x0):]
        else:
            rec = _per_sample_loss(model, target_x0, t_target, noise_target, target_cond)
            ret = _per_sample_loss(model, bank_x0, t_bank, noise_bank, null_conditions(model, len(bank_x0)))
        if mode == "weighting":
            ret = ret * importance_weights(t_bank, T, "xi", beta)
    if psi and mode == "weighting":  # one rule for the target, with or without a bank
        rec = rec * importance_weights(t_target, T, "psi", alpha)
    recon = rec.mean()
    if ret is None:
        return LossParts(recon, recon, recon.new_zeros(()), t_target, None)
    retention = ret.mean()
    return LossParts(recon + lam * retention, recon, retention, t_target, t_bank)
