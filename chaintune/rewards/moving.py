"""Rewards and a judge for moving-digit videos (``builtin:moving-digits``), all offline.

Videos are ``[n, F, 1, H, W]`` in [0, 1]: a light digit on a black canvas. Two measurements underlie
everything here, and each reward has a held-out twin built on a *different* measurement, so a model that
games one (moves ink mass without moving a digit, draws a blob a classifier likes) is caught by the other:

============================  ==========================================  =========================================
reward (differentiable?)      training measurement                        held-out twin (never trained on)
============================  ==========================================  =========================================
``moving-digit[:K]`` (yes)    mean over frames of log p(K | crop) by the   the same with the digit MLP
                              digit CNN; crop = 8x8 window at the ink
                              centroid (differentiable resampling)
``motion[:DIR]`` (yes)        ink-centroid velocity along DIR, px/frame    first-to-last displacement by
                                                                          cross-correlation of the frames / (F-1)
``smoothness`` (yes)          -(mean squared centroid acceleration)        -(mean squared acceleration of the
                                                                          cross-correlation track)
``video-compressibility``     -(size of the clip as an animated GIF, kB)   -(size of the raw clip under LZMA, kB)
(no: black box)
============================  ==========================================  =========================================

Without ``K`` / ``DIR`` the digit / direction comes from each sample's prompt ("a 7 moving left"), which
makes the reward *prompt fidelity*. :func:`judge` reports what a person would check: the share of frames
whose digit the held-out MLP reads as the prompt's, whether the digit moved the way the prompt says (ink
centroid), and the speed error — the acceptance measure of the built-in model and of video alignment.
"""

from __future__ import annotations

import io
import lzma

import numpy as np
import torch
import torch.nn.functional as F

from chaintune.classifiers import load_classifier
from chaintune.data.moving import DIGIT_SIZE, DIRECTIONS, parse_prompt
from chaintune.errors import ChaintuneError
from chaintune.metrics import nearest_real_distance
from chaintune.rewards.base import NetworkReward
from chaintune.rewards.video import VideoReward, check_videos

__all__ = ["metrics", "judge_summary", "ink_centroids", "centroid_crops", "correlation_track", "MovingDigitReward",
           "MotionReward", "SmoothnessReward", "VideoCompressibilityReward", "judge"]

_EPS = 1e-3


def _frames(videos: torch.Tensor) -> torch.Tensor:
    """[n, F, H, W] grey frames (RGB averaged), float32 unless float64."""
    x = videos.float() if videos.dtype in (torch.float16, torch.bfloat16) else videos
    return x.mean(2) if x.shape[2] != 1 else x[:, :, 0]


def ink_centroids(videos: torch.Tensor) -> torch.Tensor:
    """Ink-weighted centre (x, y) in pixels of every frame, [n, F, 2]; differentiable (a blank frame -> centre)."""
    x = _frames(videos).clamp(min=0)
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=x.dtype, device=x.device)
    xs = torch.arange(w, dtype=x.dtype, device=x.device)
    mass = x.sum((-2, -1)) + _EPS
    cx = (x.sum(-2) * xs).sum(-1) + _EPS * (w - 1) / 2
    cy = (x.sum(-1) * ys).sum(-1) + _EPS * (h - 1) / 2
    return torch.stack([cx / mass, cy / mass], -1)


def centroid_crops(videos: torch.Tensor, size: int = DIGIT_SIZE) -> torch.Tensor:
    """The ``size`` x ``size`` window centred on each frame's ink centroid, [n * F, 1, size, size] (bilinear,
    differentiable in the pixels and the centroid): the digit wherever it is on the canvas, at the 8x8
    resolution the shipped classifiers read."""
    x = _frames(videos)
    n, f, h, w = x.shape
    c = ink_centroids(videos).reshape(n * f, 2)
    theta = torch.zeros(n * f, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = size / w, size / h
    theta[:, 0, 2] = (2 * c[:, 0] + 1) / w - 1  # pixel centre -> [-1, 1] (align_corners=False)
    theta[:, 1, 2] = (2 * c[:, 1] + 1) / h - 1
    grid = F.affine_grid(theta, (n * f, 1, size, size), align_corners=False)
    return F.grid_sample(x.reshape(n * f, 1, h, w), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


@torch.no_grad()
def correlation_track(videos: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Position of every frame's content relative to frame 0, [n, F, 2] (dx, dy) in pixels: the peak of the
    cross-correlation with frame 0, refined to sub-pixel by a parabola through the peak and its neighbours.
    Independent of the ink centroid (it follows the *pattern*, not the mass); not differentiable."""
    x = _frames(videos).detach().double()
    n, f, h, w = x.shape
    r = radius if radius is not None else max(h, w) // 2
    ref = x[:, 0]  # [n, H, W] kernels, one per clip
    out = torch.zeros(n, f, 2, dtype=torch.float64)
    for k in range(1, f):
        corr = F.conv2d(F.pad(x[:, k], (r, r, r, r))[None], ref[:, None], groups=n)[0]  # [n, 2r+1, 2r+1]
        flat = corr.flatten(1).argmax(1)
        iy, ix = flat // (2 * r + 1), flat % (2 * r + 1)
        sub = []
        for c, idx, axis in ((corr, ix, 1), (corr, iy, 0)):
            lo = (idx - 1).clamp(0, 2 * r)
            hi = (idx + 1).clamp(0, 2 * r)
            rows = torch.arange(n)
            if axis == 1:
                a, b, d = c[rows, iy, lo], c[rows, iy, idx], c[rows, iy, hi]
            else:
                a, b, d = c[rows, lo, ix], c[rows, idx, ix], c[rows, hi, ix]
            den = a - 2 * b + d
            delta = torch.where((den.abs() > 1e-12) & (hi - lo == 2), 0.5 * (a - d) / den, 0.0).clamp(-0.5, 0.5)
            sub.append(idx.double() - r + delta)
        out[:, k] = torch.stack(sub, -1)
    return out.to(videos.device, torch.float32)


def _directions(direction: str | None, prompts, n: int, device) -> torch.Tensor:
    """Unit (dx, dy) per sample: the fixed DIR, or each prompt's direction."""
    if direction is not None:
        return torch.tensor([DIRECTIONS[direction]] * n, dtype=torch.float32, device=device)
    if prompts is None:
        raise ChaintuneError("motion without a direction reads it from the prompts; the model gave none "
                             "(write motion:left|right|up|down)")
    return torch.tensor([parse_prompt(p).unit for p in prompts], dtype=torch.float32, device=device)


def _digits(digit: int | None, prompts, n: int, device) -> torch.Tensor:
    if digit is not None:
        return torch.full((n,), digit, dtype=torch.long, device=device)
    if prompts is None:
        raise ChaintuneError("moving-digit without K reads the digit from the prompts; the model gave none "
                             "(write moving-digit:K)")
    return torch.tensor([parse_prompt(p).digit for p in prompts], dtype=torch.long, device=device)


class MovingDigitReward(NetworkReward, VideoReward):
    """``moving-digit[:K]``: mean over frames of log p(K | centroid crop) (differentiable)."""

    differentiable = True

    def __init__(self, digit: int | None = None, classifier: str = "digits-cnn",
                 prefix: str = "moving-digit") -> None:
        super().__init__()
        if digit is not None and not 0 <= int(digit) <= 9:
            raise ChaintuneError(f"{prefix}:K needs a digit K in 0..9, got {digit}")
        self.digit = None if digit is None else int(digit)
        self.classifier = classifier
        self.needs_prompts = self.digit is None
        self.name = prefix if self.digit is None else f"{prefix}:{self.digit}"

    def load(self):
        import copy

        return copy.deepcopy(load_classifier(self.classifier))

    def frame_log_probs(self, videos: torch.Tensor) -> torch.Tensor:
        """[n, F, 10] class log-probabilities of every frame's centroid crop."""
        n, f = videos.shape[:2]
        net = self.network(videos.device)
        logits = net(centroid_crops(videos).to(self.net_dtype())).float()
        return F.log_softmax(logits, -1).view(n, f, 10)

    def forward(self, videos, prompts, labels, metadata):
        logp = self.frame_log_probs(videos)
        k = _digits(self.digit, prompts, videos.shape[0], videos.device)
        return logp.gather(2, k[:, None, None].expand(-1, logp.shape[1], 1)).squeeze(2).mean(1)


class MotionReward(VideoReward):
    """``motion[:DIR]``: mean velocity of the ink centroid along DIR in px/frame (differentiable)."""

    differentiable = True

    def __init__(self, direction: str | None = None, heldout: bool = False) -> None:
        if direction is not None and direction not in DIRECTIONS:
            raise ChaintuneError(f"motion:DIR needs DIR in {', '.join(DIRECTIONS)}, got {direction!r}")
        self.direction, self.heldout = direction, heldout
        self.needs_prompts = direction is None
        self.differentiable = not heldout
        base = "motion-heldout" if heldout else "motion"
        self.name = base if direction is None else f"{base}:{direction}"

    def forward(self, videos, prompts, labels, metadata):
        n, f = videos.shape[:2]
        if f < 2:
            return videos.flatten(1).sum(1) * 0.0
        u = _directions(self.direction, prompts, n, videos.device)
        if self.heldout:
            track = correlation_track(videos)
            return (track[:, -1] * u).sum(-1) / (f - 1)
        c = ink_centroids(videos)
        return ((c[:, -1] - c[:, 0]) * u).sum(-1) / (f - 1)


class SmoothnessReward(VideoReward):
    """``smoothness``: -(mean squared acceleration of the digit's track), px/frame^2; 0 for constant velocity.

    A still or blank video is perfectly smooth: pair it with ``motion`` or ``moving-digit``."""

    def __init__(self, heldout: bool = False) -> None:
        self.heldout = heldout
        self.differentiable = not heldout
        self.name = "smoothness-heldout" if heldout else "smoothness"

    def forward(self, videos, prompts, labels, metadata):
        if videos.shape[1] < 3:
            return videos.flatten(1).sum(1) * 0.0
        track = correlation_track(videos) if self.heldout else ink_centroids(videos)
        acc = track[:, 2:] - 2 * track[:, 1:-1] + track[:, :-2]
        return -(acc**2).sum(-1).mean(1)


def gif_size_kb(videos: torch.Tensor) -> torch.Tensor:
    """Size in kB of each clip saved as an animated GIF by PIL (grey frames)."""
    from PIL import Image

    arr = (_frames(videos).detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    sizes = []
    for clip in arr:
        frames = [Image.fromarray(fr, mode="L") for fr in clip]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=125, loop=0)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=videos.device)


def lzma_size_kb(videos: torch.Tensor) -> torch.Tensor:
    arr = (_frames(videos).detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    sizes = [len(lzma.compress(np.ascontiguousarray(c).tobytes(), preset=6)) / 1000 for c in arr]
    return torch.tensor(sizes, dtype=torch.float32, device=videos.device)


class VideoCompressibilityReward(VideoReward):
    """``video-compressibility``: -(animated-GIF size in kB), a black-box reward (DDPO's JPEG one for clips).
    Its held-out twin measures the raw clip under LZMA, another compressor with other blind spots."""

    differentiable = False

    def __init__(self, heldout: bool = False) -> None:
        self.heldout = heldout
        self.name = "video-compressibility-heldout" if heldout else "video-compressibility"

    def forward(self, videos, prompts, labels, metadata):
        return -(lzma_size_kb(videos) if self.heldout else gif_size_kb(videos))


@torch.no_grad()
def judge(videos: torch.Tensor, prompts: list[str], classifier: str = "digits-mlp") -> dict[str, torch.Tensor]:
    """Per clip, what the prompt asked for and what the clip shows (all [n]):

    * ``identity``: share of frames whose centroid crop ``classifier`` (default the held-out MLP) reads as the
      prompt's digit;
    * ``direction``: 1 when the ink centroid moved the prompt's way: displacement along the asked direction
      at least half the asked travel and more than twice the displacement across it;
    * ``speed_error``: |measured - asked| speed along the direction, px/frame;
    * ``ink``: mean ink per frame relative to a real digit (about 1; a blank or washed-out clip is far off).
    """
    check_videos(videos, "judge")
    n, f = videos.shape[:2]
    if len(prompts) != n:
        raise ChaintuneError(f"judge needs one prompt per clip, got {len(prompts)} for {n}")
    motions = [parse_prompt(p) for p in prompts]
    reader = MovingDigitReward(None, classifier)
    pred = reader.frame_log_probs(videos).argmax(-1).cpu()  # [n, F]
    digit = torch.tensor([m.digit for m in motions])
    identity = (pred == digit[:, None]).float().mean(1)
    c = ink_centroids(videos).cpu()
    disp = c[:, -1] - c[:, 0]
    u = torch.tensor([m.unit for m in motions], dtype=torch.float32)
    along = (disp * u).sum(-1)
    across = (disp - along[:, None] * u).norm(dim=-1)
    asked = torch.tensor([m.speed for m in motions])
    direction = ((along >= 0.5 * asked * (f - 1)) & (along > 2 * across)).float()
    speed_error = (along / max(f - 1, 1) - asked).abs()
    ink = _frames(videos).sum((-2, -1)).mean(1).cpu() / REAL_DIGIT_INK
    return {"identity": identity, "direction": direction, "speed_error": speed_error, "ink": ink}


REAL_DIGIT_INK = 19.6
"""Mean ink (sum of pixel values in [0, 1]) of a scikit-learn digit (train split), the judge's ``ink`` unit."""


def judge_summary(videos: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Means of :func:`judge` over clips, plus ``follows_prompt``: share of clips with identity >= 0.5 and the
    right direction."""
    j = judge(videos, prompts)
    follows = ((j["identity"] >= 0.5) & (j["direction"] > 0)).float()
    return {"identity": float(j["identity"].mean()), "direction": float(j["direction"].mean()),
            "speed_error": float(j["speed_error"].mean()), "ink": float(j["ink"].mean()),
            "follows_prompt": float(follows.mean())}


def metrics(arg: str | None, videos: torch.Tensor, prompts: list[str] | None,
            labels: torch.Tensor | None) -> dict[str, float]:
    """Evaluation metrics of every moving-digit reward family (:mod:`chaintune.rewards.evaluation`):
    ``nn_distance`` (crops at the ink centroid to the nearest real digit: the realism measure the hacking
    guard watches), the :func:`judge_summary` when the prompts are moving-digit prompts, and for
    ``moving-digit:K`` the share of frames the held-out MLP reads as K (``class_share``)."""

    check_videos(videos, "moving-digit metrics")
    videos = videos.detach().float().cpu()
    out = {"nn_distance": nearest_real_distance(centroid_crops(videos))}
    if prompts is not None:
        try:
            out.update(judge_summary(videos, list(prompts)))
        except ChaintuneError:
            pass  # prompts that are not "a K moving DIR": no prompt-fidelity judge
    if arg is not None and arg.strip().isdigit():
        pred = MovingDigitReward(None, "digits-mlp").frame_log_probs(videos).argmax(-1)
        out["class_share"] = float((pred == int(arg)).float().mean())
    return out
