"""``chaintune controlnet`` (generated from ControlNetConfig): a ControlNet over a frozen base, Diff-Tuning or plain."""

from __future__ import annotations

import typer

from chaintune.cli.options import config_command
from chaintune.controlnet.config import ControlNetConfig


def _controlnet(cfg: ControlNetConfig, *, resume: bool, overwrite: bool) -> None:
    from chaintune.controlnet.trainer import train_controlnet
    from chaintune.run.trainer import format_summary

    res = train_controlnet(cfg, cfg.run.out, overwrite=overwrite, resume=resume)
    typer.echo(format_summary(res))


def register(app: typer.Typer) -> None:
    config_command(app, "controlnet", ControlNetConfig, _controlnet,
                   help="Train a ControlNet (edges or silhouette control) over a frozen base with Diff-Tuning's psi "
                   "timesteps or plain uniform ones. Bases: builtin:digits-cond (pixel space), Stable Diffusion "
                   "1.x/2.x and SDXL (saved as StableDiffusion[XL]ControlNetPipeline directories).")
