"""``chaintune.estimate_gradient``: one gradient estimate, without stepping — the research entry point."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from chaintune.backends.base import DiffusionModel
from chaintune.estimators import EstimationContext, Estimator, get_estimator
from chaintune.rewards import get_reward
from chaintune.sampling import chain_scheduler, make_conditions


def estimate_gradient(
    model: DiffusionModel,
    reward,
    estimator: str | Estimator,
    n: int,
    steps: int = 50,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    labels=None,
    prompts=None,
    guidance_scale: float | None = None,
    scheduler: str | object = "ddim",
    baseline: str = "prompt",
    checkpoint: bool = True,
    return_stats: bool = False,
    control: torch.Tensor | None = None,
    reference: Callable[[], contextlib.AbstractContextManager] | None = None,
    **estimator_kwargs,
):
    """Estimate grad_theta E[R(x_0)] over the trainable parameters (``requires_grad``).

    Returns ``{parameter name: gradient}`` in the *ascent* direction (the gradient of the
    expected reward). The parameters' ``.grad`` are left as they were. For PPO-style estimators
    only the first (on-policy) pass is used. ``control``: the control images of a ControlNet-steered model
    (``chaintune.backends.controlled``), one per sample; they reach the reward as ``metadata["control"]``.
    ``reference``: a context under which the model runs the reference policy (DPO's loss, GRPO's KL); by default
    the model as given, i.e. one estimate at the reference, as at a run's first step.
    """

    est = get_estimator(estimator, **estimator_kwargs)
    rew = get_reward(reward)
    gen = generator or torch.Generator().manual_seed(0)
    cond = make_conditions(model, n, labels=labels, prompts=prompts, guidance_scale=guidance_scale, generator=gen)
    cond.control = control  # a ControlNet-steered model's control images, [n, C, H, W]
    ctx = EstimationContext(model=model, reward=rew, n=n, steps=steps, eta=eta,
                            scheduler=chain_scheduler(model, scheduler), generator=gen, conditions=cond,
                            checkpoint=checkpoint, baseline=baseline, reference=reference or contextlib.nullcontext)
    params = ctx.params
    saved = [p.grad for _, p in params]
    for _, p in params:
        p.grad = None
    try:
        stats = next(iter(est.updates(ctx)))
        grads = {k: (-p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params}
    finally:
        for (_, p), g in zip(params, saved, strict=True):
            p.grad = g
    return (grads, stats) if return_stats else grads
