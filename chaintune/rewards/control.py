"""Condition-consistency rewards for ControlNets: does the sample show the control it was asked to follow?

ControlNet++'s idea (Li et al., ECCV 2024): apply the condition extractor to the generated image and score its
agreement with the input control. The extractors are chaintune's own (:mod:`chaintune.data.conditions`):
their hard thresholds have no gradient, so each training reward uses a *soft* twin of its extractor, and each
has a held-out judge that measures agreement another way (the hacking guard's third signal):

* ``edge-consistency`` (differentiable): soft IoU of a soft Sobel edge map of the sample — sigmoid of
  (magnitude / the image's largest magnitude - ``EDGE_THRESHOLD``) / ``SOFTNESS`` — with the control's edges.
  Held out: ``edge-chamfer``, minus the symmetric chamfer distance (pixels) between the sample's hard edge map
  and the control's, from Euclidean distance transforms: it scores how *far* a missing stroke is, not overlap.
* ``silhouette-consistency`` (differentiable): soft IoU of the sample's soft silhouette (sigmoid mask at half
  the image's maximum, pooled to ``SILHOUETTE_CELLS`` cells a side and blurred back) with the control.
  Held out: ``silhouette-iou``, IoU of the hard silhouettes binarised at 0.5 (what ``chaintune controlnet``'s
  evaluation reports as ``condition_iou``).

The control reaches every reward as ``metadata["control"]`` ([n, C, H, W] in [0, 1], the ControlNet's input):
a reward of your own (``module:function`` with a ``metadata`` argument) reads it the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chaintune.data.conditions import EDGE_THRESHOLD, SILHOUETTE_CELLS, condition_iou, edges
from chaintune.errors import ChaintuneError
from chaintune.rewards.base import Reward

__all__ = ["ConsistencyReward", "EdgeChamferReward", "SilhouetteIoUReward", "control_of", "soft_edges",
           "soft_silhouette", "soft_iou", "SOFTNESS"]

# The sigmoid's temperature, in units of the extractor's threshold scale (magnitude / max, grey / max): 0.05
# turns a value 0.1 above the threshold into 0.88, so the soft map agrees with the hard one on all but the
# pixels within about 0.1 of the threshold, while still passing a gradient to them.
SOFTNESS = 0.05


def control_of(metadata: Any, n: int, name: str) -> torch.Tensor:
    """The control images ``metadata["control"]`` as grey [n, 1, H, W] maps (what the extractors compare with)."""
    control = metadata.get("control") if isinstance(metadata, dict) else None
    if control is None:
        raise ChaintuneError(f"reward {name!r} scores agreement with a ControlNet's control image, and none came "
                             f"with the samples; use it with `chaintune align --controlnet RUN`")
    if not isinstance(control, torch.Tensor) or control.dim() != 4 or control.shape[0] != n:
        shape = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
        raise ChaintuneError(f"reward {name!r}: metadata['control'] must be [n={n}, C, H, W], got {shape}")
    return control[:, :1] if control.dtype == torch.float64 else control[:, :1].float()


def _grey(images: torch.Tensor) -> torch.Tensor:
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    return x.mean(1, keepdim=True)


def _image_max(x: torch.Tensor) -> torch.Tensor:
    """Per-image maximum (the thresholds are relative to it, as the hard extractors' are)."""
    return x.flatten(1).amax(1).view(-1, 1, 1, 1).clamp(min=1e-6)


def soft_edges(images: torch.Tensor, threshold: float = EDGE_THRESHOLD, softness: float = SOFTNESS) -> torch.Tensor:
    """Differentiable counterpart of :func:`~chaintune.data.conditions.edges`: [N, 1, H, W] in (0, 1)."""
    x = _grey(images)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
    k = torch.stack([sobel, sobel.t()])[:, None]
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    mag = (g.pow(2).sum(1, keepdim=True) + 1e-12).sqrt()
    return torch.sigmoid((mag / _image_max(mag) - threshold) / softness)


def soft_silhouette(images: torch.Tensor, cells: int = SILHOUETTE_CELLS, softness: float = SOFTNESS) -> torch.Tensor:
    """Differentiable counterpart of :func:`~chaintune.data.conditions.silhouette`."""
    x = _grey(images)
    mask = torch.sigmoid((x / _image_max(x) - 0.5) / softness)
    h, w = mask.shape[-2:]
    low = F.adaptive_avg_pool2d(mask, (min(cells, h), min(cells, w)))
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Weighted Jaccard sum(min(a, b)) / sum(max(a, b)) per image, for maps in [0, 1]: IoU for binary maps, 1 for
    two equal soft maps (the product form a b / (a + b - a b) is not), 1 for two empty maps."""
    inter = torch.minimum(a, b).flatten(1).sum(1)
    union = torch.maximum(a, b).flatten(1).sum(1)
    return torch.where(union > 1e-6, inter / union.clamp(min=1e-6), torch.ones_like(union))


# condition -> (reward name, agreement of the samples' soft map with the control's map): edge maps are binary, so the
# control is binarised; a silhouette is soft on both sides
_SOFT = {
    "edges": ("edge-consistency", lambda images, target: soft_iou(soft_edges(images), (target > 0.5).to(target.dtype))),
    "silhouette": ("silhouette-consistency", lambda images, target: soft_iou(soft_silhouette(images), target)),
}


class ConsistencyReward(Reward):
    """Soft IoU of the condition extracted from the sample with the control (``edges`` or ``silhouette``)."""

    differentiable = True

    def __init__(self, condition: str) -> None:
        self.name, self.agreement = _SOFT[condition]

    def forward(self, images, prompts, labels, metadata):
        target = control_of(metadata, len(images), self.name).to(images.device, _grey(images).dtype)
        if target.shape[-2:] != images.shape[-2:]:
            raise ChaintuneError(f"reward {self.name!r}: control {tuple(target.shape[-2:])} and samples "
                                 f"{tuple(images.shape[-2:])} differ in size")
        return self.agreement(images, target)


class EdgeChamferReward(Reward):
    """Minus the symmetric chamfer distance (pixels) between the sample's edge map and the control's edges."""

    name = "edge-chamfer"

    def forward(self, images, prompts, labels, metadata):
        from scipy.ndimage import distance_transform_edt

        target = (control_of(metadata, len(images), self.name) > 0.5).cpu().numpy()[:, 0]
        found = edges(images.detach().float().cpu().clamp(0, 1)).numpy()[:, 0] > 0.5
        out = []
        for a, b in zip(found, target, strict=True):
            if not a.any() and not b.any():
                out.append(0.0)
            elif not a.any() or not b.any():
                out.append(-float(np.hypot(*a.shape)))  # one map empty: as far as the image is wide
            else:
                to_b, to_a = distance_transform_edt(~b), distance_transform_edt(~a)
                out.append(-0.5 * (float(to_b[a].mean()) + float(to_a[b].mean())))
        return torch.tensor(out, dtype=torch.float32, device=images.device)


class SilhouetteIoUReward(Reward):
    """IoU of the hard silhouettes (binarised at 0.5): ``chaintune controlnet``'s ``condition_iou``."""

    name = "silhouette-iou"

    def forward(self, images, prompts, labels, metadata):
        target = control_of(metadata, len(images), self.name)
        return condition_iou("silhouette", images.detach().float().cpu().clamp(0, 1), target).to(images.device)
