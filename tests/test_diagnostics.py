"""Sample diagnostics of transfer runs (chaintune.transfer.diagnostics), checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chaintune.transfer.diagnostics import (
    class_histogram,
    copy_share,
    model_sample_report,
    nearest_distance,
    sample_report,
)


def _fixed_classifier(pred: list[int], num_classes: int = 10):
    """A stand-in classifier that calls the i-th image pred[i], whatever it shows."""
    def classify(images: torch.Tensor) -> torch.Tensor:
        assert len(images) == len(pred)
        return torch.nn.functional.one_hot(torch.tensor(pred), num_classes).float() * 5.0
    return classify


def _rms_to_nearest(images: torch.Tensor, refs: torch.Tensor) -> np.ndarray:
    """Pair by pair in numpy: min over references of sqrt(mean squared pixel difference)."""
    a, b = images.double().numpy(), refs.double().numpy()
    return np.array([min(np.sqrt(((x - r) ** 2).mean()) for r in b) for x in a])


def test_nearest_distance():
    refs = torch.zeros(3, 1, 2, 2)
    refs[1] += 1.0
    imgs = torch.stack([torch.full((1, 2, 2), 0.25), torch.full((1, 2, 2), 0.9)])
    assert nearest_distance(imgs, refs).tolist() == pytest.approx([0.25, 0.1])
    g = torch.Generator().manual_seed(1)
    x, r = torch.rand(7, 1, 4, 4, generator=g), torch.rand(5, 1, 4, 4, generator=g)
    assert nearest_distance(x, r).numpy() == pytest.approx(_rms_to_nearest(x, r))


def test_histogram_source_share_and_label_match_from_known_predictions():
    pred = [5, 5, 6, 0, 1, 9, 5, 7, 7]
    labels = torch.tensor([5, 6, 6, 0, 1, 9, 5, 8, 7])
    g = torch.Generator().manual_seed(0)
    images, shots, heldout = (torch.rand(n, 1, 8, 8, generator=g) for n in (9, 5, 11))
    shot_labels = torch.tensor([5, 6, 7, 8, 9])
    rep = sample_report(images, shots, shot_labels, heldout, labels=labels, classifier=_fixed_classifier(pred))
    assert list(rep) == ["hist", "source_share", "nn_train", "nn_heldout", "copies", "label_match"]
    # 9 samples: 5 three times, 7 twice, 0, 1, 6 and 9 once
    assert rep["hist"] == pytest.approx([1 / 9, 1 / 9, 0, 0, 0, 3 / 9, 1 / 9, 2 / 9, 0, 1 / 9], abs=1e-4)
    assert rep["source_share"] == pytest.approx(2 / 9)  # the 0 and the 1: classes 0-4 are not among the shots
    assert rep["label_match"] == pytest.approx(7 / 9)  # all but sample 1 (5 for 6) and sample 7 (7 for 8)
    assert class_histogram(torch.tensor(pred), 10).sum() == pytest.approx(1.0)


def test_unconditional_and_unlabelled_targets_leave_out_their_numbers():
    g = torch.Generator().manual_seed(0)
    images, shots, heldout = (torch.rand(n, 1, 8, 8, generator=g) for n in (3, 2, 5))
    rep = sample_report(images, shots, None, heldout, classifier=_fixed_classifier([1, 2, 3]))
    assert set(rep) == {"hist", "nn_train", "nn_heldout", "copies"}


def test_copies_of_shots_count_as_copies_and_medians_are_nearest_shot_distances():
    g = torch.Generator().manual_seed(3)
    shots = torch.rand(4, 1, 8, 8, generator=g)
    heldout = torch.rand(21, 1, 8, 8, generator=g)
    fresh = torch.rand(6, 1, 8, 8, generator=g)
    images = torch.cat([shots[[0, 2, 3]], fresh])  # 3 exact copies of shots, 6 new images
    rep = sample_report(images, shots, torch.zeros(4, dtype=torch.long), heldout,
                        classifier=_fixed_classifier([0] * 9))
    d_gen, d_new = _rms_to_nearest(images, shots), _rms_to_nearest(heldout, shots)
    assert d_gen[:3] == pytest.approx(0.0, abs=1e-12)
    threshold = np.quantile(d_new, 0.05)  # linear interpolation, as torch.quantile
    assert rep["copies"] == pytest.approx((d_gen < threshold).mean())
    assert rep["copies"] >= 3 / 9
    assert rep["nn_train"] == pytest.approx(np.median(d_gen))  # odd counts: the middle value
    assert rep["nn_heldout"] == pytest.approx(np.median(d_new))
    assert rep["source_share"] == 0.0  # every sample is called 0, the shots' only class
    # a held-out set of shot copies: nothing is nearer than them, so no sample counts as a copy
    assert copy_share(torch.tensor(d_gen), torch.zeros(5, dtype=torch.float64)) == 0.0


def test_the_shipped_classifier_on_real_digits():
    from chaintune.classifiers import load_classifier
    from chaintune.data import digits_split

    x, y = digits_split("test")
    images, labels = x[:31], y[:31]
    rep = sample_report(images, x[100:140], y[100:140], x[200:230], labels=labels)
    pred = load_classifier("digits-cnn")(images).argmax(1)
    assert rep["label_match"] == pytest.approx(float((pred == labels).double().mean()))
    counts = np.bincount(pred.numpy(), minlength=10) / 31
    assert rep["hist"] == pytest.approx(counts.tolist(), abs=1e-4)


def test_model_sample_report_reports_the_models_own_samples():
    from chaintune.testing import tiny_unet_model
    from chaintune.transfer.data import generate

    model = tiny_unet_model(num_class_embeds=11)
    g = torch.Generator().manual_seed(0)
    shots, heldout = torch.rand(6, 1, 8, 8, generator=g), torch.rand(7, 1, 8, 8, generator=g)
    shot_labels = torch.tensor([5, 6, 7, 5, 6, 7])
    rep = model_sample_report(model, (shots, shot_labels), heldout, n=9, steps=3, seed=7)
    imgs, labels = generate(model, 9, 3, 1.0, seed=7, classes=shot_labels, with_labels=True)
    assert labels is not None and set(labels.tolist()) <= {5, 6, 7}
    assert rep == sample_report(imgs, shots, shot_labels, heldout, labels=labels)
