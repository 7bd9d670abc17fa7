"""Pretraining the built-in ``builtin:digits-cond`` base (``chaintune/configs/builtin_digits_cond.yaml``).

It is ``pretrain``'s objective (same config, loss, EMA and run directory) with the class-conditional
pixel ``UNet2DConditionModel`` of :mod:`chaintune.controlnet.pixel` in place of the ``UNet2DModel``:
the label reaches the UNet as a class token in ``encoder_hidden_states`` (dropped to the null token
with probability ``label_dropout``, for classifier-free guidance). Rebuild the shipped weights with::

    python -m chaintune.controlnet.base chaintune/configs/builtin_digits_cond.yaml runs/builtin-digits-cond
    cp -r runs/builtin-digits-cond/model/. chaintune/assets/digits-cond/
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from chaintune.backends.base import Conditions
from chaintune.chain import add_noise, training_target
from chaintune.training.config import PretrainConfig
from chaintune.training.pretrain import PretrainObjective
from chaintune.training.trainer import Trainer

__all__ = ["CondPretrainObjective", "pretrain_digits_cond"]


class CondPretrainObjective(PretrainObjective):
    """``pretrain`` with a class-token ``UNet2DConditionModel`` (what a ControlNet can be built from)."""

    def prepare(self, run: Trainer) -> None:
        from diffusers import DDPMScheduler

        from chaintune.controlnet.pixel import PixelCondModel, build_cond_unet
        from chaintune.data import load_dataset

        cfg, arch = self.cfg, self.cfg.arch
        images, self.labels = load_dataset(cfg.dataset, size=arch.resolution)
        self.x_all = (images * 2 - 1).to(run.device)
        sched = DDPMScheduler(num_train_timesteps=arch.num_train_timesteps, beta_schedule=arch.beta_schedule,
                              prediction_type=arch.prediction_type)
        self.model = PixelCondModel(build_cond_unet(arch).to(run.device), sched, source="pretrain")

    def updates(self, run: Trainer, step: int):
        cfg, g, arch = self.cfg, run.generator, self.cfg.arch
        n, total = cfg.optim.batch_size, 0.0
        for _ in range(cfg.optim.grad_accum):
            idx = torch.randint(0, len(self.x_all), (n,), generator=g)
            x0 = self.x_all[idx.to(self.x_all.device)]
            noise = torch.randn(x0.shape, generator=g).to(x0)
            t = torch.randint(0, arch.num_train_timesteps, (n,), generator=g).to(x0.device)
            labels = self.labels[idx].clone()
            labels[torch.rand(n, generator=g) < cfg.label_dropout] = self.model.null_label
            xt = add_noise(self.model.scheduler, x0, noise, t)
            with run.autocast():
                out = self.model.model_output(xt, t, Conditions(labels=labels))
            loss = F.mse_loss(out.float(), training_target(self.model.scheduler, x0, noise, t).float())
            loss.backward()
            total += float(loss.detach()) / cfg.optim.grad_accum
        yield cfg.optim.grad_accum, {"loss": total}


def pretrain_digits_cond(cfg: PretrainConfig, out: str | Path | None = None, **trainer):
    """Train the class-token UNet on ``cfg.dataset``; with ``out``, a run directory (a model id)."""
    obj = CondPretrainObjective(cfg)
    Trainer(cfg, obj, out=out, **trainer).fit()
    return obj.model


if __name__ == "__main__":  # python -m chaintune.controlnet.base CONFIG OUT
    from chaintune.options import load_config

    config, out = sys.argv[1], sys.argv[2]
    pretrain_digits_cond(load_config(config, PretrainConfig, "pretrain option"), out, thread_policy=True)
