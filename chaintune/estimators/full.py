"""Full backpropagation: pathwise gradient through every step (the exact, memory-hungry reference).

Plan: every position PATHWISE. Estimate: -mean R(x_0), backpropagated. Memory grows with the
number of steps (with checkpointing: one latent per step plus one step's activations).
"""

from __future__ import annotations

from chaintune.chain import StepGrad
from chaintune.estimators.base import EstimationContext, Estimator, Stats, draw_noise, rollout
from chaintune.estimators.options import takes


class FullBackprop(Estimator):
    name = "full-backprop"
    needs_differentiable_reward = True
    options = takes("full-backprop")

    def plan(self, num_steps, generator=None):
        return [StepGrad.PATHWISE] * num_steps

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        x_T, noises = draw_noise(ctx, ctx.n)
        traj, images, r = rollout(ctx, self.plan(ctx.steps), x_T=x_T, noises=noises, cond=ctx.conditions,
                                  grad_reward=True)
        (-r.sum() / ctx.n).backward()
        yield Stats(rewards=r.detach(), images=images.detach())
