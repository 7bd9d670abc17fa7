"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al. 2025, arXiv 2509.16117).

No likelihoods and no stored trajectory: a no-grad rollout with any sampler gives clean samples x_0 and their
rewards. Each sample's advantage A is GRPO's (group-normalised, Flow-GRPO's global std, clipped to +-``adv_clip``)
and becomes an optimality probability

    r = clip(A / adv_clip / 2 + 1/2, 0, 1).

At a training time t the forward process noises x_0 again (x_t = add_noise(x_0, eps, t), a fresh eps), and from
the current policy's x_0-prediction x_theta and the sampling ("old") policy's x_old NFT defines an implicit
positive and an implicit negative policy,

    x_plus = beta x_theta + (1 - beta) x_old,        x_minus = (1 + beta) x_old - beta x_theta,

and minimises (per sample and time; then the mean over both)

    adv_clip * [ r |x_plus - x_0|^2 / w_plus + (1 - r) |x_minus - x_0|^2 / w_minus ] / beta,

|.|^2 the mean over dimensions, w the adaptive weight: the sample's mean |x_hat - x_0|, detached, at least 1e-5.
This is the official code's loss (and Flow-Factory's ``DiffusionNFTTrainer``). They mix velocities; mixing the
x_0-predictions is the same thing, since x_0 is affine in the velocity (flow) or the noise (DDPM) with the same
coefficients for both policies: one formula for both model families (:func:`chaintune.chain.predict_x0`).

On-policy (chaintune updates once per rollout), x_old is the current prediction detached: the values coincide and
the gradient is adv_clip * 2 (2r - 1) (x_theta - x_0) / w . grad x_theta: flow matching towards samples with a
positive advantage and away from those with a negative one, beta cancelling. Each training time is backpropagated
on its own (memory of one denoiser call). CFG-free as in the paper: the denoiser is called as the chain calls it.
"""

from __future__ import annotations

import torch

from chaintune.chain import StepGrad, add_noise, predict_x0, prepare_scheduler
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext, Estimator, Sampled, Stats, draw_noise, rollout
from chaintune.estimators.baselines import grpo_advantages, step_group_keys
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import takes


def nft_loss(x_theta: torch.Tensor, x_old: torch.Tensor, x0: torch.Tensor, r: torch.Tensor, beta: float,
             adv_clip: float) -> torch.Tensor:
    """Per-sample DiffusionNFT loss (module docstring) from x_0-predictions of the current and old policies."""
    def weighted_error(x_hat: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x0.dim()))
        w = (x_hat.detach() - x0).abs().mean(dims, keepdim=True).clamp_min(1e-5)
        return ((x_hat - x0) ** 2 / w).mean(dims)

    x_old = x_old.detach()
    positive = weighted_error(beta * x_theta + (1 - beta) * x_old)
    negative = weighted_error((1 + beta) * x_old - beta * x_theta)
    return adv_clip * (r * positive + (1 - r) * negative) / beta


class DiffusionNFT(Estimator):
    name = "nft"
    compares_group = True
    options = takes("nft")

    def __init__(self, nft_beta: float = D.nft_beta, global_std: bool = D.global_std,
                 train_timesteps: int = D.train_timesteps, adv_clip: float = 5.0):
        if nft_beta <= 0 or train_timesteps < 0 or adv_clip <= 0:
            raise ChaintuneError(f"nft needs nft_beta > 0, train_timesteps >= 0 and adv_clip > 0, got {nft_beta}, "
                                 f"{train_timesteps}, {adv_clip}")
        self.nft_beta = nft_beta
        self.global_std = global_std
        self.train_timesteps = train_timesteps
        self.adv_clip = adv_clip

    def plan(self, num_steps, generator=None):
        return [StepGrad.NONE] * num_steps  # the rollout carries no gradient; training is on the forward process

    def needs_step_batch(self, ctx: EstimationContext) -> bool:
        return True  # GRPO's advantages: groups and the global std over the whole step

    def step_advantages(self, rewards: torch.Tensor, keys: list[str] | None) -> torch.Tensor:
        return grpo_advantages(rewards, keys, self.global_std, self.adv_clip)

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        x_T, noises = draw_noise(ctx, ctx.n)
        with torch.no_grad():
            traj, images, rewards = rollout(ctx, StepGrad.NONE, x_T=x_T, noises=noises, cond=ctx.conditions)
        if ctx.step_shared:
            yield Sampled(rewards, step_group_keys(ctx))
            adv = ctx.step_advantages
        else:
            adv = self.step_advantages(rewards, step_group_keys(ctx))
        x0 = traj.x0.detach()
        r = (adv.to(x0.device, torch.float32) / self.adv_clip / 2 + 0.5).clamp(0, 1)
        sched = prepare_scheduler(ctx.scheduler, ctx.steps, device=x0.device)
        times = training_times(traj.timesteps, self.train_timesteps, ctx.generator)
        denoise = ctx.model.denoise_fn(ctx.conditions)
        total = 0.0
        for t in times:
            eps = torch.randn(x0.shape, generator=ctx.generator).to(x0)
            tb = t.expand(ctx.n)
            x_t = add_noise(sched, x0, eps, tb)
            with ctx.autocast():
                x_theta = predict_x0(sched, denoise(x_t, t.to(x_t.device)), x_t, tb)
                loss = nft_loss(x_theta, x_theta, x0, r, self.nft_beta, self.adv_clip).mean()
            (loss / len(times)).backward()
            total += float(loss.detach())
        yield Stats(rewards=rewards, images=images, extra={"nft_loss": total / len(times),
                                                            "optimality": float(r.mean())})


def training_times(timesteps: torch.Tensor, k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The chain's timesteps to train at: all of them (k = 0), or k drawn without replacement."""
    if k == 0 or k >= len(timesteps):
        return list(timesteps)
    idx = torch.randperm(len(timesteps), generator=generator)[:k].sort().values
    return [timesteps[int(i)] for i in idx]
