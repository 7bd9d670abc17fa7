"""Rewards on videos ``[n, F, C, H, W]`` in [0, 1] (what a video backend's ``decode`` returns).

Spec syntax (one term of a reward spec; terms combine with ``+`` and weights as usual)::

    frames:AGG:SPEC          the image reward SPEC on every frame, aggregated over frames by AGG
    frames:AGG/K:SPEC        ... on every K-th frame only (0, K, 2K, ...): K times cheaper at scale
    temporal-consistency     -(mean squared difference between consecutive frames)

``AGG`` is ``mean``, ``min`` or ``max``; ``SPEC`` is one registered image-reward term, e.g.
``frames:mean:digit:3``, ``frames:min:jpeg-compressibility`` or ``frames:mean/4:aesthetic:clip=DIR,head=FILE``.
A ``+`` starts a new top-level term, so a weighted per-frame sum is a sum of ``frames`` terms:
``0.7*frames:mean:digit:3+0.3*frames:mean:jpeg-compressibility`` (for ``mean`` the same thing). A
``module:function`` inside ``frames`` is refused: the ``--resume`` guard against saved configs that import
code (``registry.code_terms``) reads top-level terms only. In Python wrap your function as
``FramesReward(FunctionReward(fn), "mean")``, or ``register_reward`` it to use it in specs.

A ``frames`` reward is differentiable exactly when SPEC is (``min``/``max`` pass the gradient to the
arg-min/max frame). ``temporal-consistency`` is differentiable and is maximised by a still video: pair it
with a per-frame reward rather than optimising it alone. Image rewards refuse videos (their shape check
wants ``[n, C, H, W]``) and video rewards refuse images, so a spec that mixes them up fails on the first
batch with the shape in the message. Evaluation: ``frames:AGG:SPEC`` has the held-out twin
``frames:AGG:TWIN`` when SPEC's family declares one, and reports SPEC's metrics on all frames.

Your own video reward: subclass :class:`VideoReward` (override ``forward``) or wrap a function
``fn(videos, [prompts], [labels], [metadata]) -> [n]`` in :class:`VideoFunctionReward`; a module attribute
that is either works as ``module:attr`` in a spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from chaintune.errors import ChaintuneError, user_code_error
from chaintune.rewards.base import (
    FunctionReward,
    Reward,
    _as_labels,
    _as_prompts,
    _is_users,
    validate_reward_output,
)
from chaintune.rewards.registry import family_of, get_reward

__all__ = ["VideoReward", "VideoFunctionReward", "FramesReward", "TemporalConsistencyReward", "is_video_reward",
           "frames_reward", "frames_heldout", "frames_metrics", "AGGREGATIONS"]

AGGREGATIONS = ("mean", "min", "max")


def check_videos(videos: Any, name: str) -> None:
    """Refuse anything but a tensor [n, F, C, H, W] (an image batch gets a hint to use an image reward)."""
    if isinstance(videos, torch.Tensor) and videos.dim() == 5:
        return
    shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
    hint = " (that is a batch of images: use an image reward)" if isinstance(videos, torch.Tensor) \
        and videos.dim() == 4 else ""
    raise ChaintuneError(f"reward {name!r} expects videos as a tensor [n, frames, C, H, W] in [0, 1], "
                         f"got {shape}{hint}")


class VideoReward(Reward):
    """Base class of rewards on videos: ``__call__(videos [n, F, C, H, W], prompts, labels, metadata) -> [n]``.

    Same contract as :class:`~chaintune.rewards.base.Reward` (prompts/labels broadcast to ``n``, black-box
    rewards run without a graph), with the shape check for videos instead of images.
    """

    name = "video-reward"

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str] | str | None = None,
                 labels: torch.Tensor | Sequence[int] | int | None = None, metadata: Any = None) -> torch.Tensor:
        check_videos(videos, self.name)
        n = videos.shape[0]
        prompts = _as_prompts(prompts, n)
        labels = _as_labels(labels, n, videos.device)
        if self.needs_prompts and prompts is None:
            raise ChaintuneError(f"reward {self.name!r} scores videos against prompts; the model gave none")
        if self.needs_labels and labels is None:
            raise ChaintuneError(f"reward {self.name!r} needs class labels or a fixed class in the spec")
        try:
            if self.differentiable:
                return self.forward(videos, prompts, labels, metadata)
            with torch.no_grad():
                return self.forward(videos.detach(), prompts, labels, metadata).detach()
        except ChaintuneError:
            raise
        except Exception as e:
            if _is_users(self):
                raise user_code_error(f"your reward {self.name!r}", e) from e
            raise


class VideoFunctionReward(VideoReward, FunctionReward):
    """A user's ``fn(videos, [prompts], [labels], [metadata]) -> [n]`` as a video reward (see FunctionReward)."""


def is_video_reward(reward: Reward) -> bool:
    """Whether ``reward`` takes videos (a VideoReward, or a weighted sum of them only)."""
    terms = getattr(reward, "terms", None)
    if terms is not None:
        return all(is_video_reward(r) for _, r in terms)
    return isinstance(reward, VideoReward)


class FramesReward(VideoReward):
    """``frames:AGG[/K]:SPEC``: an image reward on each (K-th) frame, aggregated over frames by mean/min/max.

    The frames of all videos go through the image reward as one batch ``[n * F, C, H, W]`` (prompts and
    labels repeated per frame), so a network reward runs once per call.
    """

    def __init__(self, image_reward: Reward, agg: str = "mean", stride: int = 1) -> None:
        if agg not in AGGREGATIONS:
            raise ChaintuneError(f"frames:AGG:SPEC aggregates with one of {', '.join(AGGREGATIONS)}, got {agg!r}")
        if stride < 1:
            raise ChaintuneError(f"frames:{agg}/K:SPEC needs K >= 1, got {stride}")
        if is_video_reward(image_reward):
            raise ChaintuneError(f"frames:{agg}:SPEC needs an image reward; {image_reward.name!r} already takes videos")
        self.inner, self.agg, self.stride = image_reward, agg, int(stride)
        self.differentiable = bool(image_reward.differentiable)
        self.needs_prompts = bool(getattr(image_reward, "needs_prompts", False))
        self.needs_labels = bool(getattr(image_reward, "needs_labels", False))
        self.name = f"frames:{agg}{'' if stride == 1 else f'/{stride}'}:{image_reward.name}"

    def forward(self, videos, prompts, labels, metadata):
        frames = videos[:, :: self.stride]
        n, f = frames.shape[:2]
        flat = frames.flatten(0, 1)
        p = None if prompts is None else [q for q in prompts for _ in range(f)]
        lab = None if labels is None else labels.repeat_interleave(f)
        values = validate_reward_output(self.inner(flat, p, lab, metadata), n * f, self.inner.name).view(n, f)
        if self.agg == "mean":
            return values.mean(1)
        return values.amin(1) if self.agg == "min" else values.amax(1)


class TemporalConsistencyReward(VideoReward):
    """``temporal-consistency``: -(mean over pixels and frame pairs of (x_{f+1} - x_f)^2), differentiable.

    0 for a still video (and for a single frame), more negative the more consecutive frames differ:
    it penalises flicker, and also all motion, so it belongs beside a per-frame reward, not alone.
    """

    name = "temporal-consistency"
    differentiable = True

    def forward(self, videos, prompts, labels, metadata):
        if videos.shape[1] < 2:
            return videos.flatten(1).sum(1) * 0.0
        x = videos.float() if videos.dtype in (torch.float16, torch.bfloat16) else videos  # fp32 sums, float64 kept
        diff = x[:, 1:] - x[:, :-1]
        return -(diff**2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------- registry glue


def _parse_frames_arg(arg: str | None) -> tuple[str, int, str]:
    """``'mean/4:digit:3'`` -> ('mean', 4, 'digit:3')."""
    head, sep, spec = (arg or "").partition(":")
    agg, slash, k = head.strip().partition("/")
    if not sep or not spec.strip() or not agg:
        raise ChaintuneError(f"reward 'frames' needs an aggregation and an image reward: frames:AGG:SPEC, e.g. "
                             f"frames:mean:digit:3 or frames:min/4:jpeg-compressibility (AGG: "
                             f"{', '.join(AGGREGATIONS)}), got frames:{arg or ''}")
    stride = 1
    if slash:
        try:
            stride = int(k)
        except ValueError:
            raise ChaintuneError(f"frames:{agg}/K:SPEC needs an integer K, got {k!r}") from None
    return agg, stride, spec.strip()


def frames_reward(arg: str | None) -> FramesReward:
    """Factory of ``frames:AGG[/K]:SPEC`` for the registry."""
    agg, stride, spec = _parse_frames_arg(arg)
    if agg not in AGGREGATIONS:  # checked before SPEC is built (it may load a network)
        raise ChaintuneError(f"frames:AGG:SPEC aggregates with one of {', '.join(AGGREGATIONS)}, got {agg!r}")
    if family_of(spec) is None:
        # a module:function here would import code unseen by code_terms (resume's --trust-code guard)
        raise ChaintuneError(f"frames:{agg}:SPEC takes a registered image reward (e.g. digit:3, "
                             f"jpeg-compressibility), got {spec!r}; for your own function use "
                             "FramesReward(FunctionReward(fn), 'mean') in Python, or register it with register_reward")
    return FramesReward(get_reward(spec), agg, stride)


def frames_heldout(arg: str | None) -> str | None:
    """``mean:digit:3`` -> ``frames:mean:digit-heldout:3`` (None when SPEC's family has no twin)."""
    _, _, spec = _parse_frames_arg(arg)
    head = (arg or "").partition(":")[0].strip()
    fam = family_of(spec)
    twin = fam[1].heldout(fam[2]) if fam is not None and fam[1].heldout is not None else None
    return f"frames:{head}:{twin}" if twin else None


def frames_metrics(arg: str | None, videos: torch.Tensor, prompts: list[str] | None,
                   labels: torch.Tensor | None) -> dict[str, float]:
    """SPEC's own metrics (its family's ``metrics``) over all frames of all videos."""
    _, _, spec = _parse_frames_arg(arg)
    fam = family_of(spec)
    if fam is None or fam[1].metrics is None:
        return {}
    check_videos(videos, f"frames:{arg}")
    f = videos.shape[1]
    p = None if prompts is None else [q for q in prompts for _ in range(f)]
    lab = None if labels is None else torch.as_tensor(labels).repeat_interleave(f)
    return fam[1].metrics(fam[2], videos.flatten(0, 1), p, lab)
