"""``chaintune sample --controlnet RUN --condition IMG``: samples that follow one condition image."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from chaintune.backends.controlled import load_controlled
from chaintune.backends.files import reading_model
from chaintune.controlnet.trainer import control_images, sample_controlled
from chaintune.data.conditions import load_condition_image, to_grey
from chaintune.errors import ChaintuneError
from chaintune.sampling import check_conditions, check_sample_memory
from chaintune.utils.images import save_grid, save_images
from chaintune.utils.threads import apply_thread_policy

__all__ = ["condition_from_image", "sample_command"]


def condition_from_image(model, image) -> torch.Tensor:
    """The ControlNet's condition map of ``image`` (a path or anything ``to_grey`` reads), at the model's pixel
    size and conditioning channels: [1, C, H, W]."""

    grey = to_grey(image)[:1]
    h, w = model.pixel_shape[1:]
    if grey.shape[-2:] != (h, w):
        grey = F.interpolate(grey, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return control_images(model, model.condition, grey)


def sample_command(controlnet: str | None, condition: Path | None, *, model: str, num: int, out: Path, steps: int,
                   eta: float, scheduler: str, seed: int, label: int | None, prompt: str | None,
                   guidance_scale: float | None, batch_size: int, device: str, allow_pickle: bool) -> None:
    import typer

    if controlnet is None or condition is None:
        raise ChaintuneError("--controlnet and --condition go together (a ControlNet run and the image it follows)")
    image = load_condition_image(condition)  # a missing or unreadable file fails now, not after loading the models
    with reading_model(Path(controlnet)):
        m = load_controlled(controlnet, base=model, device=device, allow_pickle=allow_pickle)
    apply_thread_policy(m)
    check_conditions(m, label=label, prompt=prompt, steps=steps)
    check_sample_memory(m, num, steps)
    control = condition_from_image(m, image).repeat(num, 1, 1, 1)
    t0 = time.time()
    images = sample_controlled(m, control, steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed),
                               labels=label, prompts=prompt, guidance_scale=guidance_scale, scheduler=scheduler,
                               batch_size=batch_size)
    save_images(images, out)
    grid = save_grid(images, out / "grid.png")
    typer.echo(f"wrote {num} samples following the {m.condition} of {condition} to {out}/ and {grid} "
               f"({time.time() - t0:.1f}s, {steps} steps)")
