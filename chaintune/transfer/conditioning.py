"""Conditions for transfer training: target samples' labels/prompts with dropout, and the null branch."""

from __future__ import annotations

import torch

from chaintune.backends.base import Conditions, DiffusionModel


def null_conditions(model: DiffusionModel, n: int) -> Conditions:
    """The unconditional branch for ``n`` samples: null label / empty prompt / nothing."""
    if model.kind == "sd":
        return Conditions(prompts=[""] * n)
    return Conditions()  # UNet and DiT backends fill in their null class when labels is None


def _null_label(model: DiffusionModel) -> int | None:
    if model.kind == "dit":
        return model.num_classes
    return getattr(model, "null_label", None)


def target_conditions(model: DiffusionModel, labels: torch.Tensor, label_dropout: float, prompt: str,
                      classes: list[str] | None, g: torch.Generator) -> Conditions:
    """Conditions for target images; with prob ``label_dropout`` a label/prompt becomes null (keeps CFG working)."""
    n = len(labels)
    drop = torch.rand(n, generator=g) < label_dropout
    if model.kind == "sd":
        names = [classes[i] if classes and i < len(classes) else str(i) for i in labels.tolist()]
        prompts = [("" if d else prompt.replace("{label}", name)) for name, d in zip(names, drop.tolist(),
                                                                                        strict=True)]
        return Conditions(prompts=prompts)
    if not model.conditional:
        return Conditions()
    null = _null_label(model)
    lab = labels.clone()
    if null is not None:
        lab[drop] = null
    return Conditions(labels=lab)


def joint_conditions(model: DiffusionModel, target: Conditions, n_target: int, n_bank: int) -> Conditions | None:
    """Target conditions followed by the null conditions of the bank, as one batch (None: not possible)."""
    if target.extra:
        return None
    if model.kind == "sd":
        prompts = list(target.prompts) if target.prompts is not None else [""] * n_target
        return Conditions(prompts=prompts + [""] * n_bank)
    if model.kind not in ("unet", "dit"):
        return None
    if target.labels is None:
        return Conditions()  # unconditional, or null labels throughout
    null = _null_label(model)
    null = 0 if null is None else null  # the UNet backend's own fallback for a model without a null class
    return Conditions(labels=torch.cat([target.labels, torch.full((n_bank,), null, dtype=torch.long)]))
