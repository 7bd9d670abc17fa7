"""DiffusionNFT and online Diffusion-DPO: their losses against hand computations on tiny tensors, the x_0 the
forward process implies, the pairs, and both objectives through `chaintune align` (with the hacking guard) on a
DDPM-style and a flow model."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from chaintune.chain import add_noise, predict_x0, prepare_scheduler, training_target
from chaintune.cli.main import main
from chaintune.errors import ChaintuneError
from chaintune.estimators import get_estimator
from chaintune.estimators.base import EstimationContext
from chaintune.estimators.dpo import dpo_loss, preference_pairs
from chaintune.estimators.nft import nft_loss
from chaintune.gradients import estimate_gradient
from chaintune.sampling import chain_scheduler
from chaintune.testing import tiny_flow_model, tiny_unet_model


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_nft_loss_matches_a_hand_computation():
    """Two samples of 3 dimensions, element by element with Python floats (the paper's eq. and the official
    code's adaptive weight: the sample's mean |x_hat - x_0|)."""
    x_theta = torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.2, -0.3]])
    x_old = torch.tensor([[0.4, -0.8, 1.5], [0.0, 0.5, -0.1]])
    x0 = torch.tensor([[0.0, -1.5, 1.0], [0.3, 0.1, 0.2]])
    r, beta, clip = torch.tensor([0.9, 0.2]), 0.7, 5.0
    got = nft_loss(x_theta, x_old, x0, r, beta, clip)
    for k in range(2):
        th, old, z = x_theta[k].tolist(), x_old[k].tolist(), x0[k].tolist()
        pos = [beta * a + (1 - beta) * b for a, b in zip(th, old, strict=True)]
        neg = [(1 + beta) * b - beta * a for a, b in zip(th, old, strict=True)]

        def err(xh, z=z):
            w = max(sum(abs(a - b) for a, b in zip(xh, z, strict=True)) / 3, 1e-5)
            return sum((a - b) ** 2 / w for a, b in zip(xh, z, strict=True)) / 3

        want = clip * (float(r[k]) * err(pos) + (1 - float(r[k])) * err(neg)) / beta
        assert float(got[k]) == pytest.approx(want, rel=1e-6)


def test_nft_on_policy_gradient_is_advantage_weighted_flow_matching():
    """With x_old = x_theta (on-policy) the gradient is clip * 2 (2r - 1) (x_theta - x_0) / w / D, beta cancelling."""
    torch.manual_seed(0)
    x0, r = torch.randn(3, 4), torch.tensor([0.0, 0.5, 0.8])
    for beta in (0.3, 1.0):
        x_theta = torch.randn(3, 4, requires_grad=True)
        nft_loss(x_theta, x_theta, x0, r, beta, 5.0).sum().backward()
        w = (x_theta.detach() - x0).abs().mean(1, keepdim=True)
        want = 5.0 * 2 * (2 * r[:, None] - 1) * (x_theta.detach() - x0) / w / 4
        torch.testing.assert_close(x_theta.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", [tiny_unet_model, tiny_flow_model])
def test_predict_x0_inverts_the_forward_process(factory):
    """The denoiser's ideal output (the training target) at add_noise(x_0, eps, t) implies x_0 exactly."""
    model = factory()
    sched = prepare_scheduler(chain_scheduler(model, "ddim"), 10)
    x0, eps = torch.randn(2, *model.latent_shape), torch.randn(2, *model.latent_shape)
    for t in sched.timesteps[[0, 4, 9]]:
        tb = t.expand(2)
        x_t = add_noise(sched, x0, eps, tb)
        torch.testing.assert_close(predict_x0(sched, training_target(sched, x0, eps, tb), x_t, tb), x0,
                                   rtol=1e-4, atol=1e-4)


def test_dpo_loss_matches_a_hand_computation():
    err_w, err_l = torch.tensor([0.30, 0.10]), torch.tensor([0.25, 0.40])
    ref_w, ref_l = torch.tensor([0.32, 0.12]), torch.tensor([0.20, 0.41])
    loss, inside = dpo_loss(err_w, err_l, ref_w, ref_l, beta=50.0)
    for k in range(2):
        x = -0.5 * 50.0 * ((float(err_w[k]) - float(ref_w[k])) - (float(err_l[k]) - float(ref_l[k])))
        assert float(inside[k]) == pytest.approx(x, rel=1e-5)
        assert float(loss[k]) == pytest.approx(-math.log(_sigmoid(x)), rel=1e-5)


def test_pairs_are_the_best_and_worst_of_each_prompt():
    r = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0, 0.0, 7.0, 4.0])
    keys = ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert preference_pairs(r, keys, 2) == ([1, 3, 4, 6], [0, 2, 5, 7])
    assert preference_pairs(torch.tensor([2.0, 2.0, 1.0]), ["a", "a", "b"], 1) == ([], [])  # a tie, a single
    # no conditions: runs of group_size consecutive samples are the groups
    assert preference_pairs(r, [""] * 8, 4) == ([3, 6], [0, 5])


def brightness(images, prompts=None, labels=None):
    return images.float().flatten(1).mean(1)


def _ctx(model, n=8, reference=None, **kw) -> EstimationContext:
    return EstimationContext(model=model, reward=brightness, n=n, steps=4, eta=1.0,
                             generator=torch.Generator().manual_seed(0), reference=reference, group_size=4, **kw)


def test_dpo_at_the_reference_has_loss_log2_and_the_pairs_gradient():
    """At the first step the policy is the reference: the loss is log 2 exactly, and the gradient is
    beta / 4 * grad (e_w - e_l) averaged over pairs and times (d/dx -log sigmoid(x) = -1/2 at 0)."""
    model = tiny_unet_model()
    est = get_estimator("dpo", train_timesteps=1)
    stats = next(est.updates(_ctx(model, reference=contextlib.nullcontext)))
    assert stats.extra["dpo_pairs"] == 2 and stats.extra["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())
    with pytest.raises(ChaintuneError, match="reference policy"):
        next(get_estimator("dpo").updates(_ctx(tiny_unet_model())))


def test_nft_and_dpo_estimate_finite_gradients_on_a_flow_model():
    model = tiny_flow_model()
    for name in ("nft", "dpo"):  # dpo: the model as given is its own reference (estimate_gradient's default)
        grads = list(estimate_gradient(model, brightness, name, n=4, steps=4, train_timesteps=2).values())
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("estimator", ["nft", "dpo"])
def test_align_runs_nft_and_dpo_with_the_guard(estimator, tmp_path):
    out = tmp_path / "run"
    main(["align", "--model", "builtin:digits", "--reward", "digit:5", "--estimator", estimator, "--steps", "2",
          "--batch-size", "8", "--sample-steps", "4", "--eval-every", "1", "--eval-samples", "8",
          "--train-timesteps", "2", "--out", str(out), "--no-progress", "--no-tensorboard", "--no-report"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = "nft_loss" if estimator == "nft" else "dpo_loss"
    trained = [r for r in rows if key in r]
    assert len(trained) == 2 and all(math.isfinite(r[key]) for r in trained)
    assert any("eval/nn_distance" in r for r in rows)  # the guard's realism check ran
    assert (out / "model" / "model_index.json").exists()


def test_estimate_gradient_runs_dpo_at_the_reference_by_default():
    """The public one-estimate API needs no trainer for DPO: the model as given is its own reference (as at a run's
    first step), and the estimate is finite and nonzero."""
    import chaintune

    model = chaintune.load("builtin:digits")
    grads = chaintune.estimate_gradient(model, "digit:3", "dpo", 8, steps=4, generator=torch.Generator().manual_seed(0))
    total = sum(float(g.norm()) for g in grads.values())
    assert total > 0 and all(bool(torch.isfinite(g).all()) for g in grads.values())
