"""Truncated backpropagation: AlignProp / DRaFT-K, and ReFL as a preset.

Plan: the last ``k`` positions PATHWISE, all earlier ones NONE. Biased (paper Prop. 6.1): the
parameters' role in the first T-k steps is ignored. ``random_k`` draws k uniformly in [1, k]
each call (AlignProp's randomised truncation). ``stop_range=(a, b)`` gives ReFL: stop at a
random chain position in [a, b] and score the model's one-step x_0 prediction there.
"""

from __future__ import annotations

import torch

from chaintune.chain import StepGrad
from chaintune.distributed import shared_plan
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext, Estimator, Stats, draw_noise, rollout
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import takes


class TruncatedBackprop(Estimator):
    name = "truncated-backprop"
    needs_differentiable_reward = True

    options = takes("truncated-backprop")

    def __init__(self, k: int = D.k, random_k: bool = False, stop_range: tuple[int, int] | str | None = None):
        if k < 1:
            raise ChaintuneError(f"k must be >= 1, got {k}")
        self.k = k
        self.random_k = random_k
        self.stop_range = stop_range

    def _k(self, generator) -> int:
        if self.random_k:
            return int(torch.randint(1, self.k + 1, (1,), generator=generator))
        return self.k

    def plan(self, num_steps, generator=None, stop_at: int | None = None, k: int | None = None):
        last = num_steps - 1 if stop_at is None else stop_at
        k = min(self._k(generator) if k is None else k, last + 1)
        return [StepGrad.PATHWISE if last - k < i <= last else StepGrad.NONE for i in range(num_steps)]

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        stop_at = None
        if self.stop_range is not None:
            # "late": ReFL's last quarter of this chain, final step excluded (the chain length is the run's)
            a, b = (min(int(ctx.steps * 0.75), ctx.steps - 2), ctx.steps - 2) if self.stop_range == "late" \
                else self.stop_range
            if not 0 <= a <= b < ctx.steps:
                raise ChaintuneError(f"stop_range {self.stop_range} must lie in [0, {ctx.steps - 1}]")
            stop_at = int(torch.randint(a, b + 1, (1,), generator=ctx.generator))
        x_T, noises = draw_noise(ctx, ctx.n)
        k = self._k(ctx.generator)
        # sharded (FSDP): every process runs the first process's plan (the same number of forwards)
        stop, k = shared_plan([-1 if stop_at is None else stop_at, k], [p for _, p in ctx.params])
        stop_at = None if stop < 0 else stop
        modes = self.plan(ctx.steps, stop_at=stop_at, k=k)
        traj, images, r = rollout(ctx, modes, x_T=x_T, noises=noises, cond=ctx.conditions, grad_reward=True,
                                  stop_at=stop_at)
        (-r.sum() / ctx.n).backward()
        yield Stats(rewards=r.detach(), images=images.detach(),
                    extra={"k": sum(m == StepGrad.PATHWISE for m in modes)})


class AlignProp(TruncatedBackprop):
    """AlignProp (Prabhudesai et al. 2023): truncated backprop with a randomised K, drawn from 1..k per estimate."""

    name = "alignprop"
    options = takes("alignprop")

    def __init__(self, k: int = D.k):
        super().__init__(k=k, random_k=True)


class ReFL(TruncatedBackprop):
    """ReFL (Xu et al. 2023): no-grad sampling to a random late step, then one pathwise step scored on
    its x_0 prediction. Default range: the last 25% of whatever chain it runs on, final step excluded."""

    name = "refl"
    options = takes("refl")

    def __init__(self, stop_range: tuple[int, int] | None = None):
        super().__init__(k=1, stop_range=stop_range or "late")
