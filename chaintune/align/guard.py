"""The hacking guard: what tells reward hacking from progress, by what the reward cannot see (its one home).

:class:`HackingGuard` judges each evaluation against the base model's (step 0); the run skeleton's
:class:`~chaintune.run.trainer.AlarmPolicy` then warns, stops or rolls back (``--on-hacking``).
"""

from __future__ import annotations

import math

import torch

from chaintune.align.config import GuardConfig
from chaintune.run.trainer import AlarmPolicy


def guard_policy(g: GuardConfig) -> AlarmPolicy:
    """What the run does when :class:`HackingGuard` raises an alarm: ``--on-hacking`` after
    ``--hacking-patience`` alarms in a row, at most ``--max-rollbacks`` rollbacks. The events are kept under
    ``hacking`` in the run's status file (what report.html and the benchmarks read)."""
    return AlarmPolicy(action=g.on_hacking, patience=g.hacking_patience, max_rollbacks=g.max_rollbacks,
                       name="hacking", label="reward hacking")


class HackingGuard:
    """Tells reward hacking from progress by what the reward cannot see.

    The first evaluation (the base model) is the reference. A later evaluation raises an alarm when
    (1) the samples leave the data: the family's realism distance (nn-distance to real digits for the
        built-ins, else ``eval/base_distance``: each sample's distance to the nearest base-model sample,
        at thumbnail size) exceeds ``tolerance`` x the base model's;
    (2) they collapse: diversity falls below ``collapse`` x the base model's; or
    (3) the held-out reward falls while the training reward keeps rising: it drops by more than half of
        its gain over the base below its best, and by more than twice the standard error of the difference
        (a fall within sampling noise is not one), at a training reward no lower than at that best.
    The trainer then warns, stops or rolls back to the best evaluation (``--on-hacking``).
    """

    def __init__(self, tolerance: float, collapse: float):
        self.tolerance, self.collapse = tolerance, collapse
        self.base: dict | None = None
        self.best: dict | None = None  # the evaluation with the highest held-out reward so far
        self._thumbs: torch.Tensor | None = None
        self._base_spread = 0.0

    @staticmethod
    def _thumbnails(images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = images.detach().float().cpu()
        n = x.shape[0]
        x = x.flatten(0, 1) if x.dim() == 5 else x  # videos [n, F, C, H, W]: every frame, then one vector a video
        if x.shape[-1] > 16:
            x = F.interpolate(x, size=(16, 16), mode="area")
        return x.reshape(n, -1)

    def base_distance(self, images: torch.Tensor) -> float:
        """Mean distance to the nearest base-model sample (RMS per pixel); for the base itself, leave-one-out."""
        x = self._thumbnails(images)
        scale = x.shape[1] ** 0.5
        if self._thumbs is None:
            self._thumbs = x
            d = torch.cdist(x, x)
            d.fill_diagonal_(float("inf"))
            self._base_spread = float(d.min(1).values.mean() / scale) if len(x) > 1 else 0.0
            return self._base_spread
        return float(torch.cdist(x, self._thumbs).min(1).values.mean() / scale)

    def alarm(self, m: dict) -> str | None:
        if self.base is None:
            self.base = dict(m)
            return None
        key = "eval/nn_distance" if "eval/nn_distance" in m else "eval/base_distance"
        r0, r = self.base.get(key), m.get(key)
        if r0 and r is not None and r > self.tolerance * r0:
            return f"{key.removeprefix('eval/')} {r:.3g} is {r / r0:.2f}x the base model's {r0:.3g}"
        d0, d = self.base.get("eval/diversity"), m.get("eval/diversity")
        if d0 and d is not None and d < self.collapse * d0:
            return f"diversity {d:.3g} fell below {self.collapse:g}x the base model's {d0:.3g} (collapse)"
        h = m.get("eval/heldout_reward")
        if h is None:
            return None
        if self.best is not None:
            h0, hb = self.base["eval/heldout_reward"], self.best["eval/heldout_reward"]
            se = math.hypot(m.get("eval/heldout_reward_se", 0.0), self.best.get("eval/heldout_reward_se", 0.0))
            if h < hb - max(0.5 * abs(hb - h0), 2 * se) and m["eval/reward"] >= self.best["eval/reward"]:
                return (f"held-out reward fell to {h:.3g} (best {hb:.3g}) while the training reward rose to "
                        f"{m['eval/reward']:.3g}")
        if self.best is None or h > self.best["eval/heldout_reward"]:
            self.best = dict(m)
        return None

    def state_dict(self) -> dict:
        thumbs = None if self._thumbs is None else self._thumbs.tolist()
        return {"base": self.base, "best": self.best, "thumbs": thumbs, "spread": self._base_spread}

    def load_state_dict(self, state: dict) -> None:
        self.base, self.best, self._base_spread = state.get("base"), state.get("best"), state.get("spread", 0.0)
        self._thumbs = None if state.get("thumbs") is None else torch.tensor(state["thumbs"])
