"""REINFORCE / DDPO: a likelihood ratio at every stochastic step, with PPO clipping.

One no-grad rollout is stored; then for each inner epoch and each stochastic position i the
log-prob log p_theta(x_{i+1} | x_i) is recomputed with a graph and DDPO's clipped objective

    loss_i = mean_k max(-A_k rho_k, -A_k clip(rho_k, 1 - eps, 1 + eps)),   rho = exp(lp_mean - lp_mean_old)

is backpropagated one position at a time (memory of one step). As in ddpo-pytorch and Flow-GRPO,
lp_mean is the Gaussian log-density *averaged* over the D latent dimensions, so ``clip_range``
(DDPO's default 1e-4) means what it means there; on the summed log-prob it would be D times tighter
and clip almost every sample after the first update. What is backpropagated is ``D * loss_i``
(see :mod:`chaintune.estimators.ppo`): on the first epoch rho = 1 and the estimate is exactly
sum_i A * grad log p_i (sum over dimensions) — unbiased with the leave-one-out baseline, the same
scale as every other estimator. Later epochs reuse the samples (off-policy, clipped): the trainer
steps the optimizer after each yield. ``clip_frac`` and ``ppo_loss`` (mean over the trained
positions of loss_i) are logged in DDPO's units.
"""

from __future__ import annotations

import torch

from chaintune.chain import DeterministicStepError, StepGrad, prepare_scheduler
from chaintune.distributed import shared_plan
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext, Estimator, Sampled, Stats, draw_noise, rollout
from chaintune.estimators.baselines import group_keys
from chaintune.estimators.half_order import final_step_pathwise
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import REUSE_ROLLOUT, takes
from chaintune.estimators.per_sample import PerSampleGradients
from chaintune.estimators.ppo import ppo_objective, step_log_prob


class Reinforce(Estimator):
    name = "reinforce"
    uses_baseline = True

    options = takes("reinforce")

    def __init__(self, inner_epochs: int = D.inner_epochs, clip_range: float = D.clip_range,
                 normalize_advantages: bool = True, step_fraction: float = 1.0, final_step: str = "skip",
                 adv_clip: float = 5.0, tracker_buffer: int = D.tracker_buffer,
                 tracker_min_count: int = D.tracker_min_count, reuse_rollout: str = D.reuse_rollout):
        if final_step not in ("skip", "pathwise"):
            raise ChaintuneError("final_step must be 'skip' (DDPO) or 'pathwise'")
        if inner_epochs < 1 or clip_range <= 0:
            raise ChaintuneError(f"inner_epochs must be >= 1 and clip_range > 0, got {inner_epochs}, {clip_range}")
        self.inner_epochs = inner_epochs
        self.clip_range = clip_range
        self.normalize_advantages = normalize_advantages
        self.step_fraction = step_fraction
        self.final_step = final_step
        self.adv_clip = adv_clip
        if reuse_rollout not in REUSE_ROLLOUT:
            raise ChaintuneError(f"reuse_rollout must be one of {', '.join(REUSE_ROLLOUT)}, got {reuse_rollout!r}")
        self.reuse_rollout = reuse_rollout
        self._per_sample_checked: bool | None = None  # whether this model's per-sample gradients matched autograd
        self._init_tracker(tracker_buffer, tracker_min_count)

    def plan(self, num_steps, generator=None):
        return [StepGrad.LIKELIHOOD] * (num_steps - 1) + [StepGrad.NONE]

    def baseline(self, ctx: EstimationContext) -> str:
        """Which baseline this estimator uses (DDPO: the context's; GRPO overrides it)."""
        return ctx.baseline

    def needs_step_batch(self, ctx: EstimationContext) -> bool:
        """DDPO's stat tracker is updated once per epoch batch (every micro-batch and process), as ddpo-pytorch does."""
        return self.baseline(ctx) == "tracker"

    def step_advantages(self, rewards: torch.Tensor, keys: list[str] | None) -> torch.Tensor:
        return self._clipped(self._tracker.update(keys or [""] * len(rewards), rewards), "tracker")

    def _step_keys(self, ctx: EstimationContext) -> list[str] | None:
        """What groups the step's samples for its statistics: the prompts (labels)."""
        return group_keys(ctx.conditions, ctx.n)

    def _clipped(self, adv: torch.Tensor, kind: str) -> torch.Tensor:
        if self.adv_clip and (self.normalize_advantages or kind in ("group", "tracker")):
            adv = adv.clamp(-self.adv_clip, self.adv_clip)  # only meaningful on a normalised scale
        return adv

    def _advantages(self, r: torch.Tensor, ctx: EstimationContext) -> torch.Tensor:
        kind = self.baseline(ctx)
        return self._clipped(self.advantages(r, ctx.conditions, kind, self.normalize_advantages), kind)

    def _penalty(self, ctx: EstimationContext, denoise, sched, traj, i: int, mean: torch.Tensor,
                 std: torch.Tensor) -> torch.Tensor | None:
        """An extra per-position loss in chaintune's (summed) units; GRPO's KL to the reference."""
        return None

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        x_T, noises = draw_noise(ctx, ctx.n)
        traj, images, r, tracked = self._rollout(ctx, x_T, noises)
        gathered = tracked if isinstance(tracked, PerSampleGradients) else None
        if not self.needs_step_batch(ctx):
            adv = self._advantages(r, ctx).to(x_T.device)
        elif ctx.step_shared:  # one of several micro-batches: the caller forms the step's advantages once
            yield Sampled(r, self._step_keys(ctx))
            adv = ctx.step_advantages.to(x_T.device)
        else:
            adv = self.step_advantages(r, self._step_keys(ctx)).to(x_T.device)
        positions = [i for i, s in enumerate(traj.stochastic.tolist()) if s]
        if not positions:
            raise ChaintuneError(f"estimator {self.name!r} needs stochastic steps (eta > 0), got eta={ctx.eta}")
        sched = prepare_scheduler(ctx.scheduler, ctx.steps, device=x_T.device)
        denoise = ctx.model.denoise_fn(ctx.conditions)
        dim = traj.latents[0][0].numel()
        for epoch in range(self.inner_epochs):
            chosen = positions
            if self.step_fraction < 1.0:
                k = max(1, round(self.step_fraction * len(positions)))
                perm = torch.randperm(len(positions), generator=ctx.generator)[:k].tolist()
                perm = shared_plan(perm, [p for _, p in ctx.params])  # sharded: the first process's subset
                chosen = [positions[int(j)] for j in perm]
            scale = len(positions) / len(chosen)  # the chosen positions stand for all of them
            clipped = ppo = approx_kl = penalty_sum = 0.0
            covered = gathered.steps if epoch == 0 and gathered is not None else set()
            if covered:  # rho = 1 at these positions: their gradient is -(1/n) sum_k A_k G_k
                gathered.combine(-adv / ctx.n)
                ppo = -float(adv.mean()) * len(covered)  # DDPO's loss at rho = 1, summed over them
            for i in chosen:
                if i in covered:
                    continue
                with ctx.autocast():
                    if epoch == 0 and tracked and i in traj.graph_log_probs:  # the rollout's graph: rho = 1 exactly
                        lp, mean, std = traj.graph_log_probs.pop(i) / dim, None, None
                    else:
                        lp, mean, std = step_log_prob(denoise, sched, traj.latents[i], traj.timesteps[i],
                                                      traj.latents[i + 1], ctx.eta)
                    old = traj.log_probs[:, i].to(lp) / dim  # stored summed log-prob -> per-dimension mean
                    per_sample, ratio = ppo_objective(adv, lp, old, self.clip_range)
                    loss = per_sample.mean()  # DDPO's loss at this position
                    pen = self._penalty(ctx, denoise, sched, traj, i, mean, std)
                total = dim * loss if pen is None else dim * loss + pen
                (total * scale).backward()
                clipped += float(((ratio - 1).abs() > self.clip_range).float().mean())
                ppo += float(loss.detach())
                approx_kl += float(0.5 * ((lp.detach() - old) ** 2).mean())
                penalty_sum += 0.0 if pen is None else float(pen.detach())
            if epoch == 0 and self.final_step == "pathwise" and len(positions) < ctx.steps:
                (-final_step_pathwise(ctx, traj.latents[-2], noises, ctx.conditions).sum() / ctx.n).backward()
            m = len(chosen)
            extra = {"epoch": epoch, "clip_frac": clipped / m, "ppo_loss": ppo / m, "approx_kl": approx_kl / m}
            extra.update(self._penalty_metrics(penalty_sum, m))
            yield Stats(rewards=r, images=images, extra=extra)

    def _rollout(self, ctx: EstimationContext, x_T: torch.Tensor, noises):
        """The epoch batch's rollout, and how the first epoch gets its gradient without a replay (``reuse_rollout``):
        a :class:`PerSampleGradients` holding each sample's gradient, True (every step's log-prob graph kept), or
        False (recompute). Not with a per-step penalty, which needs the recomputed step, nor a subset of steps,
        drawn after the rollout."""
        if self.reuse_rollout != "off" and self.step_fraction == 1.0 and not self.needs_reference:
            try:
                if self.reuse_rollout == "graph":
                    return (*rollout(ctx, self.plan(ctx.steps), x_T=x_T, noises=noises, cond=ctx.conditions), True)
                gathered = PerSampleGradients(ctx.model.denoiser, ctx.n)
                if gathered.supported and self._per_sample_checked is not False:
                    return self._per_sample_rollout(ctx, x_T, noises, gathered)
            except DeterministicStepError:  # a step without noise has no likelihood ratio: recompute instead
                pass
        with torch.no_grad():
            return (*rollout(ctx, StepGrad.NONE, x_T=x_T, noises=noises, cond=ctx.conditions), False)

    def _per_sample_rollout(self, ctx: EstimationContext, x_T: torch.Tensor, noises, gathered: PerSampleGradients):
        """The rollout with each trained step backpropagated into ``gathered`` as it is sampled; the first step of
        the estimator's first rollout is checked against autograd (False: this model recomputes from then on)."""
        ok = [True]

        def on_log_prob(i: int, lp: torch.Tensor) -> None:
            if ok[0]:
                check = self._per_sample_checked is None
                ok[0] = gathered.add(i, lp, check=check)
                if check:
                    self._per_sample_checked = ok[0]

        with gathered:
            traj, images, r = rollout(ctx, self.plan(ctx.steps), x_T=x_T, noises=noises, cond=ctx.conditions,
                                      on_log_prob=on_log_prob)
        return traj, images, r, gathered if ok[0] else False

    def _penalty_metrics(self, penalty_sum: float, m: int) -> dict:
        return {}
