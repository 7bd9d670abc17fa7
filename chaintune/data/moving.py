"""Moving digits: procedural text-to-video clips made from scikit-learn's 8x8 digits.

A clip is one digit (the fixed train or test split of :func:`chaintune.data.digits.digits_split`) moving
in a straight line across a ``canvas`` x ``canvas`` black canvas over ``frames`` frames, with a prompt
that says which digit, which way and how fast: ``"a 7 moving left"``, ``"a 3 moving up slowly"``. Speeds
are :data:`SPEEDS` pixels per frame; the path is centred on the canvas (the digit passes the centre
mid-clip) and shifted by up to :data:`JITTER` px along and across it, keeping the whole 8x8 digit on the
canvas; sub-pixel positions are rendered bilinearly. This is the
training data of ``builtin:moving-digits`` and the reference the video judge (:mod:`chaintune.rewards.moving`)
is checked against: generated clips must be judged as their prompts say.

Clips are ``[n, F, 1, H, W]`` in [0, 1], the layout video backends decode to and video rewards take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chaintune.data.digits import digits_split
from chaintune.errors import ChaintuneError

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction name -> unit (dx, dy) in image coordinates (y grows downwards)."""
SPEEDS: dict[str, float] = {"": 1.0, "slowly": 0.5}
"""Speed word of the prompt -> pixels per frame ("" is the normal speed)."""
DIGIT_SIZE = 8
JITTER = 1.0
"""Largest shift (px) of a clip's path from the canvas-centred one, along and across the motion."""
PROMPT_RE = re.compile(r"^a (\d) moving (left|right|up|down)(?: (slowly))?$")


@dataclass(frozen=True)
class Motion:
    """What a prompt asks for: a digit, a direction and a speed (pixels per frame)."""

    digit: int
    direction: str
    speed: float

    @property
    def prompt(self) -> str:
        word = next(w for w, v in SPEEDS.items() if v == self.speed)
        return f"a {self.digit} moving {self.direction}" + (f" {word}" if word else "")

    @property
    def unit(self) -> tuple[int, int]:
        return DIRECTIONS[self.direction]


def parse_prompt(prompt: str) -> Motion:
    """``"a 7 moving left slowly"`` -> Motion(7, "left", 0.5); anything else is refused."""
    m = PROMPT_RE.match(prompt.strip().lower())
    if not m:
        raise ChaintuneError(f"not a moving-digits prompt: {prompt!r} (write e.g. 'a 7 moving left' or "
                             "'a 3 moving up slowly')")
    return Motion(int(m.group(1)), m.group(2), SPEEDS[m.group(3) or ""])


def all_prompts() -> list[str]:
    """Every prompt the built-in model was trained on (10 digits x 4 directions x 2 speeds)."""
    return [Motion(d, k, v).prompt for d in range(10) for k in DIRECTIONS for v in SPEEDS.values()]


def render(digits: torch.Tensor, motions: list[Motion], frames: int = 8, canvas: int = 16,
           generator: torch.Generator | None = None, jitter: float = JITTER) -> torch.Tensor:
    """Clips [n, F, 1, canvas, canvas] of each 8x8 digit image moving as its :class:`Motion` says."""
    n = digits.shape[0]
    if len(motions) != n:
        raise ChaintuneError(f"got {len(motions)} motions for {n} digits")
    room = canvas - DIGIT_SIZE
    unit = torch.tensor([m.unit for m in motions], dtype=torch.float32)  # [n, 2] (dx, dy)
    travel = torch.tensor([m.speed for m in motions]) * (frames - 1)
    if float(travel.max()) > room:
        raise ChaintuneError(f"a {frames}-frame clip at {float(travel.max() / (frames - 1))} px/frame leaves a "
                             f"{canvas}px canvas; use a larger canvas or fewer frames")
    u = torch.rand(n, 2, generator=generator) * 2 - 1  # [-1, 1)
    # the path is centred on the canvas (the digit passes the centre mid-clip), shifted by up to ``jitter`` px
    # along and across it, as far as the canvas allows: where a digit is follows from its prompt, so the
    # prompt carries most of a clip's layout (with uniform starts the model hardly learnt to read prompts)
    slack_along = ((room - travel) / 2).clamp(max=jitter)[:, None]
    centre = room / 2 - unit * travel[:, None] / 2
    start = centre + torch.where(unit != 0, slack_along, torch.full_like(u, min(jitter, room / 2))) * u
    t = torch.arange(frames, dtype=torch.float32)
    pos = start[:, None] + unit[:, None] * torch.tensor([m.speed for m in motions])[:, None, None] * t[None, :, None]
    # paste each digit at the canvas centre, then translate every frame by (pos - centre) with bilinear sampling
    c0 = room / 2
    base = torch.zeros(n, 1, canvas + 2, canvas + 2)  # a 1-px black border so bilinear edges fade to black
    o = int(c0) + 1
    base[:, :, o:o + DIGIT_SIZE, o:o + DIGIT_SIZE] = digits.float()
    shift = pos - c0 - (int(c0) - c0)  # [n, F, 2] pixels
    scale = 2.0 / (canvas + 2)
    theta = torch.zeros(n * frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = canvas / (canvas + 2)
    theta[:, :, 2] = -shift.reshape(-1, 2) * scale
    grid = F.affine_grid(theta, (n * frames, 1, canvas, canvas), align_corners=False)
    src = base.repeat_interleave(frames, dim=0)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, frames, 1, canvas, canvas).clamp(0, 1)


def moving_digits(n: int, split: str = "train", frames: int = 8, canvas: int = 16,
                  generator: torch.Generator | None = None, prompts: list[str] | None = None
                  ) -> tuple[torch.Tensor, list[str]]:
    """``n`` random clips and their prompts (or clips for the given prompts, with random digit images)."""
    images, labels = _split(split)
    if prompts is None:
        choices = all_prompts()
        idx = torch.randint(len(choices), (n,), generator=generator)
        prompts = [choices[i] for i in idx.tolist()]
    motions = [parse_prompt(p) for p in prompts]
    picks = []
    for m in motions:
        pool = (labels == m.digit).nonzero().flatten()
        picks.append(int(pool[torch.randint(len(pool), (1,), generator=generator)]))
    return render(images[picks], motions, frames, canvas, generator), list(prompts)


_SPLITS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in _SPLITS:
        _SPLITS[split] = digits_split(split)
    return _SPLITS[split]
