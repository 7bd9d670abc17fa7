"""Half-order estimator: likelihood ratio at the end of short pathwise spans of h steps.

For a span of positions s..e (h = e - s + 1), the chain x_s -> x_{e+1} is reparameterised inside
the span (PATHWISE) and the last transition's Gaussian noise carries a likelihood ratio
(LIKELIHOOD): (R - b) * grad_theta log N(x_{e+1}; mean_theta(x_e(theta)), std^2), which covers
the parameters used at all h positions of the span. h = 1 is REINFORCE / DDPO's term.

``HalfOrder(h)`` tiles the whole chain with such spans (aligned to the data end) after one
no-grad rollout, and replays them one at a time from the stored latents and noise, so memory is
that of h steps. A deterministic final step (zero noise) cannot carry a likelihood ratio: it is
covered pathwise when the reward is differentiable, otherwise left out (as DDPO does; this
biases only that step's share, and ``final_step`` says which happened).
"""

from __future__ import annotations

import torch

from chaintune.chain import StepGrad, run_chain
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import EstimationContext, Estimator, Stats, draw_noise, rollout
from chaintune.estimators.options import DEFAULTS as D
from chaintune.estimators.options import takes


def spans_ending_at(ends: list[int], h: int, floor: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] spans of length h ending at each ``end`` (clipped at ``floor``)."""
    return [(max(floor, e - h + 1), e) for e in ends]


def tile(num_stochastic: int, h: int) -> list[tuple[int, int]]:
    """Spans of length h covering positions 0..num_stochastic-1, aligned to the data end."""
    ends = list(range(num_stochastic - 1, -1, -h))
    return [(max(0, e - h + 1), e) for e in ends]


def span_modes(num_steps: int, span: tuple[int, int], rest: StepGrad = StepGrad.NONE) -> list[StepGrad]:
    s, e = span
    modes = [rest] * num_steps
    for i in range(s, e):
        modes[i] = StepGrad.PATHWISE
    modes[e] = StepGrad.LIKELIHOOD
    return modes


def replay_span_log_prob(ctx: EstimationContext, latents, noises, span, cond) -> torch.Tensor:
    """log p(x_{e+1} | span) with a graph through the span, replayed from stored latents/noise."""
    s, e = span
    modes = span_modes(ctx.steps, span)
    with ctx.autocast():
        traj = run_chain(ctx.model.denoise_fn(cond), ctx.scheduler, latents[s], num_steps=ctx.steps, eta=ctx.eta,
                         modes=modes, noises=noises, checkpoint=ctx.checkpoint, start=s, stop_at=e)
    return traj.graph_log_probs[e]


def final_step_pathwise(ctx: EstimationContext, x_last: torch.Tensor, noises, cond) -> torch.Tensor:
    """R(x_0) with a graph through the final position only (its input detached)."""
    last = ctx.steps - 1
    modes = [StepGrad.NONE] * last + [StepGrad.PATHWISE]
    with ctx.autocast():
        traj = run_chain(ctx.model.denoise_fn(cond), ctx.scheduler, x_last, num_steps=ctx.steps, eta=ctx.eta,
                         modes=modes, noises=noises, checkpoint=ctx.checkpoint, start=last)
    images = ctx.model.decode(traj.x0)
    return ctx.reward(images, **cond.reward_kwargs())


class HalfOrder(Estimator):
    name = "half-order"
    uses_baseline = True

    options = takes("half-order")

    def __init__(self, h: int = D.h, normalize_advantages: bool = False, tracker_buffer: int = D.tracker_buffer,
                 tracker_min_count: int = D.tracker_min_count):
        if h < 1:
            raise ChaintuneError(f"h must be >= 1, got {h}")
        self.h = h
        self.normalize_advantages = normalize_advantages
        self._init_tracker(tracker_buffer, tracker_min_count)

    def plan(self, num_steps, generator=None):
        """Representative plan: the span that ends at the last stochastic position."""
        return span_modes(num_steps, (max(0, num_steps - 1 - self.h), num_steps - 2)) if num_steps > 1 else [
            StepGrad.PATHWISE]

    def updates(self, ctx: EstimationContext):
        self.check(ctx)
        x_T, noises = draw_noise(ctx, ctx.n)
        with torch.no_grad():
            traj, images, r = rollout(ctx, StepGrad.NONE, x_T=x_T, noises=noises, cond=ctx.conditions)
        adv = self.advantages(r, ctx.conditions, ctx.baseline, self.normalize_advantages).to(x_T.device)
        stoch = traj.stochastic.tolist()
        n_stoch = len(stoch) if all(stoch) else stoch.index(False)
        if not all(stoch[:n_stoch]) or any(stoch[n_stoch:-1]) or n_stoch < len(stoch) - 1:
            raise ChaintuneError("half-order spans need every step but the last to be stochastic (eta > 0)")
        spans = tile(n_stoch, self.h)
        for span in spans:
            lp = replay_span_log_prob(ctx, traj.latents, noises, span, ctx.conditions)
            (-(adv * lp).sum() / ctx.n).backward()
        final = "likelihood"
        if n_stoch < ctx.steps:
            if getattr(ctx.reward, "differentiable", False):
                (-final_step_pathwise(ctx, traj.latents[-2], noises, ctx.conditions).sum() / ctx.n).backward()
                final = "pathwise"
            else:
                final = "skipped"
        yield Stats(rewards=r, images=images, extra={"spans": len(spans), "final_step": final})
