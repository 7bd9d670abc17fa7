"""Evaluation declared by the reward family: one object that scores evaluation samples for any spec.

A trainer should not know which reward it optimises. :func:`reward_evaluation` reads what each
term's family declared in the registry (:func:`chaintune.rewards.register_reward`'s ``heldout`` and
``metrics``) and returns a :class:`RewardEvaluation` that logs, for any spec:

* ``eval/reward``: the training reward's mean;
* ``eval/heldout_reward``: the mean of the held-out twin (a judge training never saw), when there is one;
* ``eval/diversity``: mean pairwise per-pixel distance (collapse to one image drives it to 0);
* each term's own metrics, e.g. for ``digit:K`` ``eval/class_share`` (share judged K by the digit MLP)
  and ``eval/nn_distance`` (distance to the nearest real digit: rises when the reward is hacked).

Composite specs (``0.7*digit:3+0.3*jpeg-compressibility``): the held-out twin is the same weighted sum
of the terms' twins, and there is none if any term has none: a "held-out" sum that reused the training
reward for some terms would be partly the training signal under a held-out name. Every term's metrics
are still reported; a metric that two terms report with different values (``digit:3+digit:5``) gets the
term as a suffix, ``eval/class_share[digit:3]`` (equal values, such as ``nn_distance``, are logged once).
User rewards (``module:function``, callables) have no family: they get ``eval/reward`` and
``eval/diversity``, plus ``eval/heldout_reward`` when a held-out spec is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chaintune.classifiers import load_classifier
from chaintune.metrics import nearest_real_distance, pairwise_diversity
from chaintune.rewards.base import Reward, WeightedSum
from chaintune.rewards.registry import family_of, get_reward, split_terms

__all__ = ["RewardEvaluation", "reward_evaluation", "heldout_spec", "digit_metrics"]

# (images, prompts, labels) -> {metric name without 'eval/': value}
TermMetrics = Callable[[torch.Tensor, "list[str] | None", "torch.Tensor | None"], dict[str, float]]


@dataclass
class RewardEvaluation:
    """Scores evaluation samples: ``evaluation(images, prompts, labels) -> {'eval/...': float}``.

    ``reward`` is the training reward, ``heldout`` its held-out twin or a user-given judge (None: none),
    ``metrics`` the per-term diagnostics their families declared, as ``(term, fn)`` pairs.
    """

    reward: Reward
    heldout: Reward | None = None
    metrics: list[tuple[str, TermMetrics]] = field(default_factory=list)
    heldout_spec: str | None = None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                 labels: torch.Tensor | Sequence[int] | None = None, metadata: Any = None) -> dict[str, float]:
        """The evaluation row (keys in the order: reward, diversity, heldout_reward, then term metrics);
        ``metadata`` reaches the rewards as it does in training (ControlNets: ``{"control": images}``)."""
        with torch.no_grad():
            row = {"eval/reward": float(self.reward(images, prompts=prompts, labels=labels, metadata=metadata).mean()),
                   "eval/diversity": pairwise_diversity(images)}
            if self.heldout is not None:
                h = self.heldout(images, prompts=prompts, labels=labels, metadata=metadata).float()
                row["eval/heldout_reward"] = float(h.mean())
                if len(h) > 1:  # its standard error: how far the mean moves by the draw of samples alone
                    row["eval/heldout_reward_se"] = float(h.std() / len(h) ** 0.5)
            if self.metrics:
                lab = None if labels is None else torch.as_tensor(labels, dtype=torch.long).flatten()
                if lab is not None and lab.numel() == 1 and len(images) != 1:
                    lab = lab.repeat(len(images))
                prm = None if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
                per_term = [(term, {k: float(v) for k, v in fn(images, prm, lab).items()})
                            for term, fn in self.metrics]
                values: dict[str, set[float]] = {}
                for _, m in per_term:
                    for k, v in m.items():
                        values.setdefault(k, set()).add(v)
                for term, m in per_term:  # a name two terms report with different values gets the term
                    for k, v in m.items():
                        row[f"eval/{k}" if len(values[k]) == 1 else f"eval/{k}[{term}]"] = v
        return row


def _terms(spec) -> list[tuple[float, str]] | None:
    """A spec's ``(weight, term)`` list, or None when it is not text (a callable or Reward has no family)."""
    if isinstance(spec, str):
        return split_terms(spec.strip())
    if isinstance(spec, Mapping):
        return [(float(w) * w2, body) for s, w in spec.items() for w2, body in split_terms(str(s).strip())]
    return None


def _heldout_terms(spec) -> list[tuple[float, str]] | None:
    terms = _terms(spec)
    if not terms:
        return None
    twins = []
    for w, body in terms:
        fam = family_of(body)
        twin = fam[1].heldout(fam[2]) if fam is not None and fam[1].heldout is not None else None
        if not twin:
            return None  # one term without a twin: no held-out reward (module docstring)
        twins.append((w, twin))
    return twins


def heldout_spec(spec: str | Mapping[str, float]) -> str | None:
    """The held-out twin the families declare: ``'digit:3'`` -> ``'digit-heldout:3'``; None when any term has none.

    For a composite spec, its weighted twins, e.g. ``'0.7*digit-heldout:3+0.3*digit-heldout:5'``.
    """
    twins = _heldout_terms(spec)
    if twins is None:
        return None
    if len(twins) == 1 and twins[0][0] == 1.0:
        return twins[0][1]
    return "+".join(f"{w!r}*{t}" for w, t in twins)


def _bind(fn: Callable, arg: str | None) -> TermMetrics:
    return lambda images, prompts, labels: fn(arg, images, prompts, labels)


def reward_evaluation(spec: str | Mapping[str, float] | Callable | Reward,
                      heldout: str | None = "auto") -> RewardEvaluation:
    """The evaluation of runs that optimise ``spec``; every name is resolved now (typos fail early).

    ``heldout``: ``"auto"`` asks the families for their twin (:func:`heldout_spec`), None or ``""``
    means no held-out reward, any other string is a reward spec.
    """
    reward = get_reward(spec)
    held: Reward | None = None
    held_spec: str | None = None
    if heldout == "auto":
        twins = _heldout_terms(spec)
        if twins is not None:
            held_spec = heldout_spec(spec)
            # built term by term: a twin that is itself a sum keeps its own weights under the outer one
            held = get_reward(twins[0][1]) if len(twins) == 1 and twins[0][0] == 1.0 \
                else WeightedSum([(w, get_reward(t)) for w, t in twins])
    elif heldout:
        held_spec = heldout
        held = get_reward(heldout)
    metrics: list[tuple[str, TermMetrics]] = []
    for _, body in _terms(spec) or []:
        fam = family_of(body)
        if fam is not None and fam[1].metrics is not None:
            metrics.append((body.strip(), _bind(fam[1].metrics, fam[2])))
    return RewardEvaluation(reward=reward, heldout=held, metrics=metrics, heldout_spec=held_spec)


def digit_metrics(images: torch.Tensor, digit: int | None, labels: torch.Tensor | None = None,
                  judge: str = "digits-mlp") -> dict[str, float]:
    """``class_share``: share of samples ``judge`` calls ``digit`` (or, without a digit, their own label);
    ``nn_distance``: :func:`chaintune.metrics.nearest_real_distance`.

    The judge is a classifier training never saw (``digit`` trains on the CNN, so the MLP judges), so
    a rising share is not one network's adversarial artefact.
    """

    out: dict[str, float] = {}
    target = digit if digit is not None else (None if labels is None else labels.to("cpu"))
    if target is not None:
        pred = load_classifier(judge)(images.detach().float().cpu()).argmax(1)
        out["class_share"] = float((pred == target).float().mean())
    out["nn_distance"] = nearest_real_distance(images)
    return out
