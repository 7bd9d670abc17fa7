"""Measurements that say which estimator suits a model and a reward, run on the user's own model and reward.

* :func:`variance_split` — how much of the reward's variance lies *between* prompts (or labels). A batch
  baseline leaves that part in every advantage of a likelihood-ratio term; a per-prompt leave-one-out baseline
  (``baseline="prompt"`` with prompts drawn in groups) removes it without bias.
* :func:`decision_profile` — *where along the chain the reward is decided*: for each step, how much the reward
  changes when only that step's noise is redrawn (Jansen's estimator of the total-effect Sobol index,
  ``S_t = E[(R(z) - R(z with z_t redrawn))^2] / (2 Var R)``). Digit identity is decided at the high-noise end;
  fine appearance (texture, crispness) at the data end. It recommends RLR's span range ``j = a,b`` (the paper's
  "diffusive chain of thought": keep the span where the reward is decided).
* :func:`gradient_quality` — the signal-to-noise ratio of repeated gradient estimates of each estimator (or of
  one term of RLR: ``TruncatedBackprop(k=1)`` is its first-order term, ``RLR(fo=False, zo=False)`` its span,
  ``RLR(fo=False, ho=False, zo=True)`` zeroth-order on every step but the last) and their cosine with a
  reference gradient (full backprop's mean): why an estimator learns or does not, in numbers.

Paper steps: t = 1 is the last step (nearest the data), chain position T - t.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from chaintune.backends.base import Conditions, DiffusionModel
from chaintune.chain import run_chain
from chaintune.errors import ChaintuneError
from chaintune.estimators.base import advantages
from chaintune.gradients import estimate_gradient
from chaintune.prompts import load_prompts
from chaintune.rewards import get_reward, validate_reward_output
from chaintune.sampling import chain_scheduler, initial_noise, make_conditions, sample

__all__ = ["grouped_conditions", "variance_split", "DecisionProfile", "decision_profile", "gradient_quality"]


def grouped_conditions(model: DiffusionModel, groups: int, per_group: int, generator: torch.Generator, *,
                       prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None) -> Conditions:
    """``groups`` prompts (or labels) drawn from a pool, each repeated ``per_group`` times in a row (what ``align``
    draws with ``--group-size``). The pool: ``prompts``/``labels`` when given, else the model's default prompts, else
    all its labels."""

    if prompts is None and labels is None:
        if model.takes_prompts and getattr(model, "default_prompts", None):
            prompts = load_prompts(model.default_prompts).prompts
        elif model.takes_labels:
            labels = list(range(model.num_classes))
        else:
            raise ChaintuneError(f"{model.kind} model {model.source!r} takes no prompts or labels: every sample has "
                                 "the same condition, so there is no between-prompt variance to measure")
    pool = list(prompts if prompts is not None else labels)
    picks = torch.randint(0, len(pool), (groups,), generator=generator).repeat_interleave(per_group).tolist()
    drawn = [pool[i] for i in picks]
    return make_conditions(model, len(drawn), prompts=drawn if prompts is not None else None,
                           labels=drawn if labels is not None else None, generator=generator)


def _score(model: DiffusionModel, reward, x0: torch.Tensor, cond: Conditions) -> torch.Tensor:
    with torch.no_grad():
        r = reward(model.decode(x0), prompts=cond.prompts, labels=cond.labels)
    return validate_reward_output(r, x0.shape[0], getattr(reward, "name", "reward")).double().cpu()


def variance_split(model: DiffusionModel, reward, *, groups: int = 16, per_group: int = 8, steps: int = 20,
                   eta: float = 1.0, scheduler: str | object = "ddim", generator: torch.Generator | None = None,
                   prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                   batch_size: int = 64) -> dict:
    """The reward's variance between prompts and within them (one-way random-effects ANOVA).

    ``groups`` prompts x ``per_group`` samples each: ``within`` is the mean of the groups' sample variances,
    ``between`` the variance of the group means less ``within / per_group`` (unbiased), ``share_between`` =
    between / (between + within). Also the variance of the advantages a batch and a per-prompt leave-one-out
    baseline give on these very samples (:func:`chaintune.estimators.base.advantages`)."""

    if per_group < 2 or groups < 2:
        raise ChaintuneError(f"variance_split needs >= 2 groups of >= 2 samples, got {groups} x {per_group}")
    reward = get_reward(reward)
    gen = generator or torch.Generator().manual_seed(0)
    cond = grouped_conditions(model, groups, per_group, gen, prompts=prompts, labels=labels)
    with torch.no_grad():
        tr = sample(model, groups * per_group, steps=steps, eta=eta, generator=gen, labels=cond.labels,
                    prompts=cond.prompts, scheduler=chain_scheduler(model, scheduler), batch_size=batch_size,
                    decode=False)
    r = _score(model, reward, tr.x0, cond)
    g = r.view(groups, per_group)
    within = float(g.var(dim=1, unbiased=True).mean())
    between = max(0.0, float(g.mean(dim=1).var(unbiased=True)) - within / per_group)
    total = between + within
    adv_batch = advantages(r.float(), cond, "batch")
    adv_prompt = advantages(r.float(), cond, "prompt")
    return {"groups": groups, "per_group": per_group, "reward_mean": float(r.mean()), "between": between,
            "within": within, "share_between": between / total if total > 0 else float("nan"),
            "advantage_var_batch": float(adv_batch.var()), "advantage_var_prompt": float(adv_prompt.var())}


@dataclass
class DecisionProfile:
    """Where along the chain a reward is decided. ``total_effect[t - 1]`` is paper step t's total-effect index
    (t = 1 the last step); ``initial`` the initial noise x_T's. Indices of independent inputs sum to >= 1 (to 1
    when the reward is additive in them)."""

    total_effect: list[float]
    initial: float
    reward_var: float
    n: int
    se: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.total_effect)

    def centre(self) -> float:
        """The mass-weighted mean paper step of the step noises (1 = the data end, T = the noise end)."""
        w = [max(0.0, v) for v in self.total_effect]
        return sum((t + 1) * v for t, v in enumerate(w)) / sum(w) if sum(w) > 0 else float("nan")

    def late_share(self) -> float:
        """Share of the step noises' mass in the low-noise half of the chain (paper steps t <= T/2)."""
        w = [max(0.0, v) for v in self.total_effect]
        return sum(w[: self.steps // 2]) / sum(w) if sum(w) > 0 else float("nan")

    def where(self) -> str:
        """``late`` when most of the step noises' effect is in the data half of the chain, ``early`` otherwise."""
        return "late" if self.late_share() > 0.5 else "early"

    def span_range(self, h: int = 1, mass: float = 0.5) -> tuple[int, int]:
        """RLR's ``j = a,b``: the shortest window of paper steps 2..T (step 1 is RLR's first-order term) of at least
        max(h, 2) steps that holds ``mass`` of those steps' total effect; ties go to the window nearer the data."""
        w = [max(0.0, v) for v in self.total_effect]
        T = self.steps
        if T < 3:
            raise ChaintuneError(f"a span range needs a chain of >= 3 steps, got {T}")
        target, best = mass * sum(w[1:]), (2, T)
        if target <= 0:
            return best
        width_min = max(h, 2)
        for width in range(width_min, T):
            for a in range(2, T - width + 2):
                if sum(w[a - 1: a - 1 + width]) >= target:
                    return a, a + width - 1
        return best

    def as_dict(self) -> dict:
        return {"total_effect": self.total_effect, "se": self.se, "initial": self.initial,
                "reward_var": self.reward_var, "n": self.n, "centre": self.centre(), "late_share": self.late_share(),
                "where": self.where(), "span_range": list(self.span_range())}


def decision_profile(model: DiffusionModel, reward, *, n: int = 32, steps: int = 20, eta: float = 1.0,
                     scheduler: str | object = "ddim", generator: torch.Generator | None = None,
                     conditions: Conditions | None = None) -> DecisionProfile:
    """For each chain step, redraw only that step's noise (and, once, only x_T) and score how much the reward
    moves: Jansen's total-effect estimator on ``n`` samples, ``T + 1`` partial rollouts (each replayed from the
    stored latent of its step, so the cost is about T/2 full samplings). Deterministic steps (eta 0) score 0."""

    reward = get_reward(reward)
    gen = generator or torch.Generator().manual_seed(0)
    if conditions is not None:
        cond = conditions
    elif model.takes_prompts and getattr(model, "default_prompts", None):
        cond = grouped_conditions(model, n, 1, gen)  # the prompts align trains on
    else:
        cond = make_conditions(model, n, generator=gen)
    sched = chain_scheduler(model, scheduler)
    denoise = model.denoise_fn(cond)
    x_T = initial_noise(model, n, gen)
    shape = x_T.shape
    noises = [torch.randn(shape, generator=gen).to(x_T) for _ in range(steps)]
    with torch.no_grad():
        base = run_chain(denoise, sched, x_T, num_steps=steps, eta=eta, noises=noises)
        r0 = _score(model, reward, base.x0, cond)

        def jansen(r: torch.Tensor) -> tuple[float, float]:
            d = 0.5 * (r - r0) ** 2
            return float(d.mean()), float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0

        fresh = run_chain(denoise, sched, initial_noise(model, n, gen), num_steps=steps, eta=eta, noises=noises)
        initial, _ = jansen(_score(model, reward, fresh.x0, cond))
        effects, ses = [], []
        for i in range(steps):  # chain position i: paper step T - i
            redrawn = list(noises)
            redrawn[i] = torch.randn(shape, generator=gen).to(x_T)
            tr = run_chain(denoise, sched, base.latents[i], num_steps=steps, eta=eta, noises=redrawn, start=i)
            d, se = jansen(_score(model, reward, tr.x0, cond))
            effects.append(d)
            ses.append(se)
    var = float(r0.var(unbiased=True)) if n > 1 else float("nan")
    scale = var if var > 0 else float("nan")
    # chain position i is paper step T - i: reverse, so total_effect[t - 1] is paper step t
    return DecisionProfile(total_effect=[e / scale for e in reversed(effects)], initial=initial / scale,
                           reward_var=var, n=n, se=[s / scale for s in reversed(ses)])


def _flat(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().double().flatten().cpu() for g in grads.values()])


def gradient_quality(model: DiffusionModel, reward, estimators: Mapping[str, object], *, reference: str = "reference",
                     reps: int = 16, n: int = 16, steps: int = 20, eta: float = 1.0, group_size: int = 1,
                     baseline: str = "batch", seed: int = 0, scheduler: str | object = "ddim",
                     prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None) -> dict[str, dict]:
    """Signal-to-noise ratio and direction of ``reps`` independent gradient estimates per estimator.

    ``estimators`` maps names to estimators (instances or names), or to ``(estimator, baseline)`` to give one its
    own baseline (else ``baseline``); the one named ``reference`` (e.g. full backprop) gives the direction the
    others are compared with: its mean over ``reps`` estimates. Per estimator:

    * ``snr``: |E g|^2 / E|g - E g|^2 of one estimate (|E g|^2 estimated without bias as |mean|^2 - tr/reps); an
      average of m estimates (a batch m times larger) has m times this;
    * ``cos_mean``: cosine of its mean estimate with the reference's mean; ``cos_single``: the mean cosine of one
      estimate with the reference's mean (what one optimizer step sees);
    * ``norm``: |mean|. Prompt models draw ``n / group_size`` prompts, each ``group_size`` times (as align does).
    Every estimator sees the same rollouts' seeds (``seed + rep``), so differences are the estimators'."""

    model_params = [p for p in model.denoiser.parameters() if p.requires_grad]
    if not model_params:
        raise ChaintuneError("gradient_quality: the model has no trainable parameters")
    if n % group_size:
        raise ChaintuneError(f"n={n} must be a multiple of group_size={group_size}")
    if reference not in estimators:
        raise ChaintuneError(f"reference {reference!r} is not among the estimators ({', '.join(estimators)})")
    samples: dict[str, list[torch.Tensor]] = {k: [] for k in estimators}
    for rep in range(reps):
        for name, spec in estimators.items():
            est, base = spec if isinstance(spec, tuple) else (spec, baseline)
            gen = torch.Generator().manual_seed(seed + rep)
            kw: dict = {}
            if model.takes_prompts or model.takes_labels:
                cond = grouped_conditions(model, n // group_size, group_size, torch.Generator().manual_seed(seed + rep),
                                          prompts=prompts, labels=labels)
                kw = {"prompts": cond.prompts, "labels": cond.labels}
            samples[name].append(_flat(estimate_gradient(model, reward, est, n, steps=steps, eta=eta, generator=gen,
                                                         baseline=base, scheduler=scheduler, **kw)))
    ref_mean = torch.stack(samples[reference]).mean(0)
    out = {}
    for name, gs in samples.items():
        g = torch.stack(gs)
        mean = g.mean(0)
        noise = float(((g - mean) ** 2).sum(1).mean()) * reps / max(1, reps - 1)  # E|g - Eg|^2, unbiased
        signal = max(0.0, float(mean.pow(2).sum()) - noise / reps)
        cos = torch.nn.functional.cosine_similarity
        out[name] = {"snr": signal / noise if noise > 0 else float("inf"), "norm": float(mean.norm()),
                     "noise": math.sqrt(noise), "cos_mean": float(cos(mean, ref_mean, dim=0)),
                     "cos_single": float(cos(g, ref_mean.expand_as(g), dim=1).mean()), "reps": reps}
    return out
