"""Normalised reward baselines of the reference implementations: DDPO's per-prompt stat tracker and
GRPO's per-group normalisation.

Both divide by a standard deviation that includes the sample itself, so unlike the leave-one-out
baselines of :func:`chaintune.estimators.base.advantages` they are not exactly unbiased; they are
what DDPO (kvablack/ddpo-pytorch, ``stat_tracking.py``) and Flow-GRPO (yifan123/flow_grpo) train with,
and they make the step size independent of the reward's scale (which PPO's fixed clip range assumes).

Samples are grouped by prompt (text models), class label (class-conditional models), or all
together (unconditional models): :func:`group_keys`.
"""

from __future__ import annotations

from collections import deque

import torch

from chaintune.backends.base import Conditions
from chaintune.errors import ChaintuneError

__all__ = ["group_keys", "group_normalized", "grpo_advantages", "step_group_keys", "PerPromptStatTracker"]


def group_keys(cond: Conditions | None, n: int) -> list[str]:
    """One string key per sample: its prompt, its label (``"label:K"``), or ``""`` for all when unconditional.
    Strings, so a tracker's state is JSON (it is saved in the trainer's checkpoint)."""
    if cond is not None and cond.prompts is not None:
        return [str(p) for p in cond.prompts]
    if cond is not None and cond.labels is not None:
        return [f"label:{int(v)}" for v in cond.labels.reshape(-1).tolist()]
    return [""] * n


def group_normalized(rewards: torch.Tensor, keys: list[str], eps: float = 1e-4,
                     global_std: bool = False) -> torch.Tensor:
    """GRPO: A_k = (r_k - mean_g) / (std + eps) over the samples of k's group g, as Flow-GRPO's
    ``PerPromptStatTracker.update``: population std (``np.std``), eps = 1e-4; ``std`` is the group's, or with
    ``global_std`` (Flow-GRPO's default and its SD3 recipes) the whole batch's. A group of one sample gets A = 0 (it
    has nothing to be compared with); when every group is a single sample (one image per prompt) Flow-GRPO turns
    per-prompt tracking off and uses the batch z-score, (r - mean) / (std + eps): so does this."""
    r = rewards.detach().double()
    if len(keys) != r.shape[0]:
        raise ChaintuneError(f"{len(keys)} group keys for {r.shape[0]} rewards")
    if len(set(keys)) == len(keys) and len(keys) > 1:
        return ((r - r.mean()) / (r.std(unbiased=False) + eps)).to(torch.float32)
    adv = torch.zeros_like(r)
    batch_std = r.std(unbiased=False)
    for key in dict.fromkeys(keys):
        idx = [i for i, k in enumerate(keys) if k == key]
        g = r[idx]
        adv[idx] = (g - g.mean()) / ((batch_std if global_std else g.std(unbiased=False)) + eps)
    return adv.to(torch.float32)


def grpo_advantages(rewards: torch.Tensor, keys: list[str] | None, global_std: bool, clip: float) -> torch.Tensor:
    """Flow-GRPO's advantages (GRPO, and DiffusionNFT's input): :func:`group_normalized` clipped to +-``clip``;
    ``keys`` None (one sample per prompt) is the batch z-score, as Flow-GRPO turns per-prompt tracking off."""
    if keys is None:
        keys = [str(i) for i in range(len(rewards))]
    return group_normalized(rewards, keys, global_std=global_std).clamp(-clip, clip)


def step_group_keys(ctx) -> list[str] | None:
    """The keys that group a step's samples for GRPO-style advantages (None: one sample per prompt)."""
    return None if ctx.group_size == 1 else group_keys(ctx.conditions, ctx.n)


class PerPromptStatTracker:
    """DDPO's per-prompt running reward statistics (ddpo-pytorch ``PerPromptStatTracker``).

    For each prompt a buffer keeps its last ``buffer_size`` rewards (this batch's included, added
    first); A = (r - mean_buffer) / (std_buffer + 1e-6). While a buffer holds fewer than ``min_count``
    rewards, the whole batch's mean and std are used instead. Population std, as ``np.std``.
    DDPO's defaults: buffer_size = min_count = 16. The buffers persist across steps: save
    :meth:`state_dict` with the checkpoint so a resumed run normalises as the uninterrupted one.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if buffer_size < 1 or min_count < 0:
            raise ChaintuneError(f"tracker buffer_size must be >= 1 and min_count >= 0, got {buffer_size}, "
                                 f"{min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}

    def update(self, keys: list[str], rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.detach().double().cpu()
        if len(keys) != r.shape[0]:
            raise ChaintuneError(f"{len(keys)} prompts for {r.shape[0]} rewards")
        adv = torch.empty_like(r)
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            buf = self.stats.setdefault(key, deque(maxlen=self.buffer_size))
            buf.extend(float(v) for v in r[idx])
            ref = r if len(buf) < self.min_count else torch.tensor(list(buf), dtype=torch.float64)
            adv[idx] = (r[idx] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return adv.to(torch.float32)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state.get("stats", {}).items()}
