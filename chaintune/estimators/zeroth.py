"""Zeroth-order (evolution strategies): parameter perturbation at every step, no backprop at all.

Plan: every position PERTURBED with its own direction u_i. Estimate per position:
(mean R(theta + sigma u) - mean R(theta - sigma u)) / (2 sigma) * u_i over mirrored half-batches
that share all sampling noise. Unbiased for the Gaussian-smoothed objective (bias O(sigma^2));
highest variance, lowest memory (inference only), works with black-box rewards.
"""

from __future__ import annotations

import torch

from chaintune.chain import StepGrad
from chaintune.estimators.base import EstimationContext, Estimator, mirrored_zeroth_order
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import takes


class ZerothOrder(Estimator):
    name = "zeroth-order"

    options = takes("zeroth-order")

    def __init__(self, sigma: float = D.sigma, shared_perturbation: bool = D.shared_perturbation):
        self.sigma = sigma
        self.shared = shared_perturbation

    def plan(self, num_steps, generator=None):
        return [StepGrad.PERTURBED] * num_steps

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        with torch.no_grad():
            stats = mirrored_zeroth_order(ctx, self.plan(ctx.steps), self.sigma, seed, shared=self.shared)
        yield stats
