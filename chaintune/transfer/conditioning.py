"""Conditions for transfer training: target samples' labels/prompts with dropout, and the null branch.

Everything here asks the model what it takes (``takes_labels``, ``takes_prompts``, ``null_label``,
``null_conditions``), so a new backend needs no change in the trainer.
"""

from __future__ import annotations

import torch

from chaintune.backends.base import Conditions, DiffusionModel


def null_conditions(model: DiffusionModel, n: int) -> Conditions:
    """The unconditional branch for ``n`` samples: null label / empty prompt / nothing."""
    return model.null_conditions(n)


def target_conditions(model: DiffusionModel, labels: torch.Tensor, label_dropout: float, prompt: str,
                      classes: list[str] | None, g: torch.Generator) -> Conditions:
    """Conditions for target images; with prob ``label_dropout`` a label/prompt becomes null (keeps CFG working).

    Prompt models get ``prompt`` with ``{label}`` replaced by the class name (``classes``) or id; label
    models get the labels, dropped to ``null_label`` where the model has one.
    """
    n = len(labels)
    drop = torch.rand(n, generator=g) < label_dropout
    cond = Conditions()
    if model.takes_prompts:
        null = model.null_conditions(n).prompts
        names = [classes[i] if classes and i < len(classes) else str(i) for i in labels.tolist()]
        cond.prompts = [null[k] if d else prompt.replace("{label}", name)
                        for k, (name, d) in enumerate(zip(names, drop.tolist(), strict=True))]
    if model.takes_labels:
        lab = labels.clone()
        if model.null_label is not None:
            lab[drop] = model.null_label
        cond.labels = lab
    return cond


def joint_conditions(model: DiffusionModel, target: Conditions, n_target: int, n_bank: int) -> Conditions | None:
    """Target conditions followed by the null conditions of the bank, as one batch (None: not possible,
    e.g. the target's conditions carry ``extra`` or leave out a field the null branch sets)."""
    try:
        return Conditions.cat([target, model.null_conditions(n_bank)])
    except ValueError:
        return None
