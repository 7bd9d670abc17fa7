"""``chaintune pretrain`` (generated from PretrainConfig): a small pixel DDPM from scratch."""

from __future__ import annotations

import typer

from chaintune.cli.options import config_command
from chaintune.pretrain.config import PretrainConfig


def _pretrain(cfg: PretrainConfig, *, resume: bool, overwrite: bool) -> None:
    from chaintune.pretrain.objective import OBJECTIVES
    from chaintune.run.trainer import Trainer, format_summary

    res = Trainer(cfg, OBJECTIVES[cfg.arch.denoiser](cfg), out=cfg.run.out, overwrite=overwrite, resume=resume).fit()
    typer.echo(format_summary(res))


def register(app: typer.Typer) -> None:
    config_command(app, "pretrain", PretrainConfig, _pretrain,
                   help="Train a small pixel diffusion model from scratch (how builtin:digits, builtin:glyphs and "
                        "builtin:moving-digits are made).")
