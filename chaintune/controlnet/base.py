"""Pretraining the built-in ``builtin:digits-cond`` base (``chaintune/configs/builtin_digits_cond.yaml``).

It is ``pretrain``'s objective (same config, loss, EMA and run directory) with the class-conditional
pixel ``UNet2DConditionModel`` of :mod:`chaintune.backends.pixel_cond` in place of the ``UNet2DModel``:
the label reaches the UNet as a class token in ``encoder_hidden_states`` (dropped to the null token
with probability ``label_dropout``, for classifier-free guidance). Rebuild the shipped weights with::
    python -m chaintune.controlnet.base chaintune/configs/builtin_digits_cond.yaml runs/builtin-digits-cond
    cp -r runs/builtin-digits-cond/model/. chaintune/assets/digits-cond/
"""

from __future__ import annotations

import sys
from pathlib import Path

from chaintune.backends.base import Conditions
from chaintune.backends.pixel_cond import PixelCondModel, build_cond_unet
from chaintune.pretrain.config import PretrainConfig
from chaintune.pretrain.objective import PretrainObjective
from chaintune.run.trainer import Trainer

__all__ = ["CondPretrainObjective", "pretrain_digits_cond"]


class CondPretrainObjective(PretrainObjective):
    """``pretrain`` with a class-token ``UNet2DConditionModel`` (what a ControlNet can be built from)."""

    def build_model(self, arch, scheduler):
        return PixelCondModel(build_cond_unet(arch), scheduler, source="pretrain")

    @property
    def null_label(self) -> int:
        return self.model.null_label

    def denoise_with(self, labels):
        return lambda x, t: self.model.model_output(x, t, Conditions(labels=labels))


def pretrain_digits_cond(cfg: PretrainConfig, out: str | Path | None = None, **trainer):
    """Train the class-token UNet on ``cfg.dataset``; with ``out``, a run directory (a model id)."""
    obj = CondPretrainObjective(cfg)
    Trainer(cfg, obj, out=out, **trainer).fit()
    return obj.model


if __name__ == "__main__":  # python -m chaintune.controlnet.base CONFIG OUT
    from chaintune.options import load_config

    config, out = sys.argv[1], sys.argv[2]
    pretrain_digits_cond(load_config(config, PretrainConfig, "pretrain option"), out)
