"""REINFORCE / DDPO: a likelihood ratio at every stochastic step, with PPO clipping.

One no-grad rollout is stored; then for each inner epoch and each stochastic position i the
log-prob log p_theta(x_{i+1} | x_i) is recomputed with a graph and the clipped PPO objective
min(A * rho, A * clip(rho, 1 - eps, 1 + eps)), rho = p_theta / p_old, is backpropagated one
position at a time (memory of one step). On the first epoch rho = 1, so the estimate is exactly
sum_i A * grad log p_i — unbiased with the leave-one-out baseline. Later epochs reuse the samples
(off-policy, clipped): the trainer steps the optimizer after each yield.
"""

from __future__ import annotations

import torch

from chaintune.chain import StepGrad, log_prob, prepare_scheduler
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext, Estimator, Stats, advantages, draw_noise, rollout
from chaintune.estimators.half_order import final_step_pathwise


class Reinforce(Estimator):
    name = "reinforce"

    def __init__(self, inner_epochs: int = 1, clip_range: float = 1e-4, normalize_advantages: bool = True,
                 step_fraction: float = 1.0, final_step: str = "skip", adv_clip: float = 5.0):
        if final_step not in ("skip", "pathwise"):
            raise ChaintuneError("final_step must be 'skip' (DDPO) or 'pathwise'")
        self.inner_epochs = inner_epochs
        self.clip_range = clip_range
        self.normalize_advantages = normalize_advantages
        self.step_fraction = step_fraction
        self.final_step = final_step
        self.adv_clip = adv_clip

    def plan(self, num_steps, generator=None):
        return [StepGrad.LIKELIHOOD] * (num_steps - 1) + [StepGrad.NONE]

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        x_T, noises = draw_noise(ctx, ctx.n)
        with torch.no_grad():
            traj, images, r = rollout(ctx, StepGrad.NONE, x_T=x_T, noises=noises, cond=ctx.conditions)
        adv = advantages(r, ctx.conditions, ctx.baseline, self.normalize_advantages).to(x_T.device)
        if self.normalize_advantages and self.adv_clip:
            adv = adv.clamp(-self.adv_clip, self.adv_clip)
        positions = [i for i, s in enumerate(traj.stochastic.tolist()) if s]
        sched = prepare_scheduler(ctx.scheduler, ctx.steps, device=x_T.device)
        denoise = ctx.model.denoise_fn(ctx.conditions)
        for epoch in range(self.inner_epochs):
            chosen = positions
            if self.step_fraction < 1.0:
                k = max(1, round(self.step_fraction * len(positions)))
                perm = torch.randperm(len(positions), generator=ctx.generator)[:k]
                chosen = [positions[int(j)] for j in perm]
            clipped = 0.0
            for i in chosen:
                with ctx.autocast():
                    lp = log_prob(denoise, sched, traj.latents[i], int(traj.timesteps[i]), traj.latents[i + 1],
                                  ctx.eta)
                ratio = torch.exp(lp - traj.log_probs[:, i].to(lp))
                unclipped = -adv * ratio
                clip = -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
                loss = torch.maximum(unclipped, clip).sum() / ctx.n * (len(positions) / len(chosen))
                loss.backward()
                clipped += float(((ratio - 1).abs() > self.clip_range).float().mean())
            if epoch == 0 and self.final_step == "pathwise" and len(positions) < ctx.steps:
                (-final_step_pathwise(ctx, traj.latents[-2], noises, ctx.conditions).sum() / ctx.n).backward()
            yield Stats(rewards=r, images=images, extra={"epoch": epoch, "clip_frac": clipped / len(chosen)})
