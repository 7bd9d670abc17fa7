"""Control images for reward fine-tuning of a ControlNet (``chaintune align --controlnet RUN``).

Every training sample follows a control drawn from the ControlNet's own training data (or ``--control-data``);
evaluation uses held-out controls, ``PER_CONTROL`` samples each, so that the hacking guard's diversity is
measured *under one control* (a ControlNet that collapses draws the same image for a control; samples of
different controls differ anyway). Evaluation adds what ``chaintune controlnet`` reports, so the two runs read
alike: ``condition_iou`` and, on digit data, ``digit_agreement`` (the held-out judges of the control).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chaintune.backends.controlled import ControlledModel
from chaintune.backends.run_dir import is_run_dir, read_run_info
from chaintune.controlnet.trainer import control_images, control_metrics, judged_by_digits, split_control_data
from chaintune.data.conditions import extract
from chaintune.errors import ChaintuneError
from chaintune.metrics import pairwise_diversity

__all__ = ["ControlPool", "PER_CONTROL", "control_data_of"]

PER_CONTROL = 4  # evaluation samples per held-out control (diversity is measured within each such group)


def control_data_of(controlnet: str, control_data: str) -> str:
    """``--control-data`` resolved: ``auto`` is the data the ControlNet was trained on (a run records it)."""
    if control_data != "auto":
        return control_data
    path = Path(controlnet).expanduser()
    if is_run_dir(path):
        info = read_run_info(path)
        data = info.get("control_data") or (info.get("config") or {}).get("data")
        if isinstance(data, str) and data:
            return data
    raise ChaintuneError(f"--controlnet {controlnet} records no training data; give the images whose conditions the "
                         f"samples should follow: --control-data DIR (or digits:train, glyphs:train)")


@dataclass
class ControlPool:
    """Training controls (drawn with the batch) and held-out controls with their condition maps and digits."""

    kind: str
    data: str
    train: torch.Tensor  # [N, C, H, W]: what the ControlNet reads
    heldout: torch.Tensor  # [M, C, H, W]
    heldout_maps: torch.Tensor  # [M, 1, H, W]: what samples are judged against
    heldout_digits: torch.Tensor | None  # [M]: the digit each held-out control came from (digit data only)
    per_control: int = PER_CONTROL  # evaluation samples per held-out control

    @classmethod
    def load(cls, model: ControlledModel, controlnet: str, control_data: str) -> ControlPool:
        data = control_data_of(controlnet, control_data)
        x, _, ex, ey = split_control_data(model.base, data)
        return cls(kind=model.condition, data=data, train=control_images(model, model.condition, x),
                   heldout=control_images(model, model.condition, ex.float()),
                   heldout_maps=extract(model.condition, ex.float()),
                   heldout_digits=ey.long() if judged_by_digits(data, ey) else None)

    def draw(self, n: int, generator: torch.Generator, group: int = 1) -> torch.Tensor:
        """``n`` training controls, each repeated ``group`` times in a row (a GRPO group shares its control)."""
        picks = torch.randint(0, len(self.train), (-(-n // group),), generator=generator).repeat_interleave(group)
        return self.train[picks[:n]]

    def _heldout_index(self, n: int) -> torch.Tensor:
        k = self.per_control
        m = min(len(self.heldout), -(-n // k))
        return torch.arange(m).repeat_interleave(k).repeat(-(-n // (m * k)))[:n]

    def heldout_controls(self, n: int) -> torch.Tensor:
        """``n`` evaluation controls: the first held-out ones, ``per_control`` samples each (the same every time)."""
        return self.heldout[self._heldout_index(n)]

    def metrics(self, images: torch.Tensor) -> dict[str, float]:
        """``condition_iou``, ``digit_agreement`` and diversity among the samples of one control (``eval/diversity``,
        what the hacking guard watches for collapse); ``eval/diversity_all`` over every sample."""
        idx = self._heldout_index(len(images))
        digits = None if self.heldout_digits is None else self.heldout_digits[idx]
        out = control_metrics(self.kind, images.float().cpu(), self.heldout_maps[idx], digits)
        groups = [images[idx == k] for k in idx.unique()]
        within = [pairwise_diversity(g) for g in groups if len(g) > 1]
        out["eval/diversity_all"] = pairwise_diversity(images)
        if within:
            out["eval/diversity"] = float(sum(within) / len(within))
        return out
