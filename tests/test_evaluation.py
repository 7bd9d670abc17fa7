"""Evaluation declared by the reward family (chaintune.rewards.evaluation)."""

from __future__ import annotations

import math

import pytest
import torch

from chaintune.classifiers import load_classifier
from chaintune.data import digits_split
from chaintune.errors import ChaintuneError
from chaintune.metrics import nearest_real_distance, pairwise_diversity
from chaintune.rewards import DigitReward, get_reward, heldout_spec, register_reward, reward_evaluation
from chaintune.rewards.registry import _REGISTRY


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Real test digits, some of them noisy (so nn_distance and class share are not trivial)."""
    x, _ = digits_split("test")
    x = x[:24].clone()
    g = torch.Generator().manual_seed(0)
    x[12:] = (x[12:] + 0.3 * torch.randn(x[12:].shape, generator=g)).clamp(0, 1)
    return x


def _hand_diversity(x: torch.Tensor) -> float:
    """Mean over ordered pairs i != j of the RMS pixel distance, pair by pair."""
    n = len(x)
    total = sum(float(((x[i] - x[j]) ** 2).mean().sqrt()) for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


def _hand_nn_distance(x: torch.Tensor) -> float:
    real, _ = digits_split("train", 8)
    rms = ((x[:, None].double() - real[None].double()) ** 2).mean((2, 3, 4)).sqrt()  # [n, n_real]
    return float(rms.min(1).values.mean())


def test_digit_k_matches_hand_computation(images):
    row = reward_evaluation("digit:3")(images)
    assert list(row) == ["eval/reward", "eval/diversity", "eval/heldout_reward", "eval/heldout_reward_se",
                         "eval/class_share", "eval/nn_distance"]
    with torch.no_grad():
        reward = float(DigitReward(3)(images).mean())
        per_image = DigitReward(3, "digits-mlp", "digit-heldout")(images)
        heldout = float(per_image.mean())
    n = len(per_image)  # the standard error from its definition: sqrt(sum (x - mean)^2 / (n - 1) / n)
    se = float(((per_image - per_image.mean()) ** 2).sum() / (n - 1) / n) ** 0.5
    assert row["eval/heldout_reward_se"] == pytest.approx(se, rel=1e-5)
    with torch.no_grad():
        share = float((load_classifier("digits-mlp")(images).argmax(1) == 3).float().mean())
    assert row["eval/reward"] == pytest.approx(reward, abs=1e-6)
    assert row["eval/heldout_reward"] == pytest.approx(heldout, abs=1e-6)
    assert row["eval/class_share"] == share  # a share of 24 images: exact
    assert row["eval/diversity"] == pytest.approx(_hand_diversity(images), abs=1e-5)
    assert row["eval/nn_distance"] == pytest.approx(_hand_nn_distance(images), abs=1e-5)
    # and bit-identical to the library functions the align trainer has used so far
    assert row["eval/diversity"] == pairwise_diversity(images)
    assert row["eval/nn_distance"] == nearest_real_distance(images)


def test_auto_heldout_twins():
    assert heldout_spec("digit:3") == "digit-heldout:3"
    assert heldout_spec("digit-heldout:3") == "digit:3"  # the twin of the held-out judge is the other network
    assert heldout_spec("digit") == "digit-heldout"
    assert heldout_spec("0.7*digit:3+0.3*digit:5") == "0.7*digit-heldout:3+0.3*digit-heldout:5"
    assert heldout_spec("digit:3+jpeg-compressibility") is None  # a term without a twin: none at all
    assert heldout_spec("jpeg-compressibility") is None


def test_composite_spec_reports_the_digit_terms_metrics(images):
    ev = reward_evaluation("digit:3+jpeg-compressibility")
    assert ev.heldout is None
    row = ev(images)
    assert set(row) == {"eval/reward", "eval/diversity", "eval/class_share", "eval/nn_distance"}
    assert row["eval/class_share"] == reward_evaluation("digit:3")(images)["eval/class_share"]
    assert row["eval/reward"] == pytest.approx(float(get_reward("digit:3+jpeg-compressibility")(images).mean()))


def test_weighted_twins_and_colliding_metric_names(images):
    row = reward_evaluation("0.7*digit:3+0.3*digit:5")(images)
    with torch.no_grad():
        h3 = DigitReward(3, "digits-mlp", "digit-heldout")(images)
        h5 = DigitReward(5, "digits-mlp", "digit-heldout")(images)
    assert row["eval/heldout_reward"] == pytest.approx(float((0.7 * h3 + 0.3 * h5).mean()), abs=1e-6)
    pred = load_classifier("digits-mlp")(images).argmax(1)
    assert row["eval/class_share[digit:3]"] == float((pred == 3).float().mean())
    assert row["eval/class_share[digit:5]"] == float((pred == 5).float().mean())
    assert "eval/nn_distance" in row  # the same value from both terms: logged once


def test_plain_digit_uses_labels(images):
    labels = torch.arange(len(images)) % 10
    row = reward_evaluation("digit")(images, labels=labels)
    pred = load_classifier("digits-mlp")(images).argmax(1)
    assert row["eval/class_share"] == float((pred == labels).float().mean())
    assert "eval/heldout_reward" in row


def test_empty_heldout_and_explicit_heldout(images):
    assert "eval/heldout_reward" not in reward_evaluation("digit:3", heldout="")(images)
    assert "eval/heldout_reward" not in reward_evaluation("digit:3", heldout=None)(images)
    row = reward_evaluation("digit:3", heldout="jpeg-compressibility")(images)
    assert row["eval/heldout_reward"] == pytest.approx(float(get_reward("jpeg-compressibility")(images).mean()))
    with pytest.raises(ChaintuneError):
        reward_evaluation("digit:3", heldout="no-such-reward")


def test_user_reward_gets_reward_and_diversity_only(images, tmp_path, monkeypatch):
    (tmp_path / "my_eval_reward.py").write_text(
        "def score(images):\n    return images.flatten(1).mean(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    row = reward_evaluation("my_eval_reward:score")(images)
    assert set(row) == {"eval/reward", "eval/diversity"}
    assert row["eval/reward"] == pytest.approx(float(images.mean()), abs=1e-6)
    assert set(reward_evaluation(lambda images: images.mean((1, 2, 3)))(images)) == {"eval/reward", "eval/diversity"}


def test_a_plugin_family_declares_its_evaluation(images):
    from chaintune.rewards import FunctionReward

    def brightness(arg):
        return FunctionReward(lambda images: images.mean((1, 2, 3)), name="brightness")

    register_reward("test-bright", brightness, heldout=lambda arg: "jpeg-compressibility",
                    metrics=lambda arg, images, prompts, labels: {"dark_share": float((images.mean((1, 2, 3)) < 0.2)
                                                                                      .float().mean())})
    try:
        row = reward_evaluation("test-bright")(images)
    finally:
        _REGISTRY.pop("test-bright")
    assert set(row) == {"eval/reward", "eval/diversity", "eval/heldout_reward", "eval/heldout_reward_se",
                        "eval/dark_share"}
    assert math.isfinite(row["eval/dark_share"])

