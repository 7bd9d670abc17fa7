"""What a transfer run's samples are: classifier histogram, source-class leakage, label match, copies of shots.

FID alone cannot tell a model that learned the target from one that reproduces its few training
shots or keeps drawing the source domain's classes; these numbers can (README, "sample report").

* ``hist``: share of each class the classifier (default the shipped ``digits-cnn``) predicts;
* ``source_share``: share predicted as a class the target's shots do not contain (leaked from the source);
* ``label_match`` (class-conditional samples): share predicted as the label each sample was drawn for;
* ``nn_train`` / ``nn_heldout``: median RMS distance of a sample / of a held-out target image to its
  nearest training shot (held-out images are new digits of the target domain: the distance of novelty);
* ``copies``: share of samples nearer to a shot than 95% of held-out images are (memorised shots).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from chaintune.classifiers import load_classifier
from chaintune.transfer.data import generate

__all__ = ["nearest_distance", "class_histogram", "copy_share", "sample_report", "model_sample_report"]


def nearest_distance(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per image, the RMS pixel distance to its nearest reference image."""
    return torch.cdist(images.flatten(1).double(), references.flatten(1).double()).amin(1) / images[0].numel() ** 0.5


def class_histogram(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of each class among predicted class ids, float64 [num_classes]."""
    return torch.bincount(pred, minlength=num_classes).double() / len(pred)


def copy_share(d_samples: torch.Tensor, d_heldout: torch.Tensor, quantile: float = 0.05) -> float:
    """Share of samples nearer to a shot than all but ``quantile`` of held-out images are."""
    return float((d_samples < d_heldout.quantile(quantile)).double().mean())


def _classifier(classifier: str | nn.Module | Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(classifier, str):
        return load_classifier(classifier)
    return classifier


@torch.no_grad()
def sample_report(images: torch.Tensor, shots: torch.Tensor, shot_labels: torch.Tensor | None,
                  heldout: torch.Tensor, labels: torch.Tensor | None = None,
                  classifier: str | nn.Module | Callable = "digits-cnn", copy_quantile: float = 0.05) -> dict:
    """The report (module docstring) of ``images`` against the training ``shots`` and ``heldout`` target images.

    ``labels``: the class each image was drawn for (None: unconditional, no ``label_match``);
    ``shot_labels`` None: no ``source_share``. ``classifier``: a shipped classifier's name or any
    ``images -> logits [n, classes]`` callable.
    """
    logits = _classifier(classifier)(images)
    pred = logits.argmax(1)
    hist = class_histogram(pred, logits.shape[1])
    d_gen, d_new = nearest_distance(images, shots), nearest_distance(heldout, shots)
    out: dict = {"hist": [round(v, 4) for v in hist.tolist()]}
    if shot_labels is not None:
        classes = set(shot_labels.tolist())
        out["source_share"] = float(sum(hist[c] for c in range(len(hist)) if c not in classes))
    out.update({"nn_train": float(d_gen.median()), "nn_heldout": float(d_new.median()),
                "copies": copy_share(d_gen, d_new, copy_quantile)})
    if labels is not None:
        out["label_match"] = float((pred == labels.to(pred.device)).double().mean())
    return out


@torch.no_grad()
def model_sample_report(model, target: tuple[torch.Tensor, torch.Tensor | None], heldout: torch.Tensor, *, n: int,
                        steps: int, eta: float = 1.0, seed: int = 12345, guidance_scale: float | None = None,
                        classifier: str | nn.Module | Callable = "digits-cnn") -> dict:
    """:func:`sample_report` of ``n`` fresh samples of ``model`` (labels drawn from the target's, as its shots).

    Pass the transfer trainer's final-evaluation settings (``seed = cfg.seed + 12345``,
    ``steps = cfg.sample_steps``, ``eta = cfg.sample_eta``, ``n = cfg.eval_samples``) to report on exactly
    the samples of the run's final FID.
    """

    shots, shot_labels = target
    imgs, labels = generate(model, n, steps, eta, seed=seed, classes=shot_labels, guidance_scale=guidance_scale,
                            with_labels=True)
    return sample_report(imgs, shots, shot_labels, heldout, labels=labels, classifier=classifier)
