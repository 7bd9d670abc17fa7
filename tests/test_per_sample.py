"""``reuse_rollout="per-sample"``: DDPO's first epoch from per-sample gradients gathered while sampling.

The same gradient as recomputing every step (the reference: the estimator with ``reuse_rollout="off"`` on the same
draws), one denoiser call per trained step fewer, on every backend's tiny model with LoRA; and where the gathering
cannot be exact (batch rows that are not whole copies of the samples, trainable tensors outside linear layers) it
recomputes, with the same result.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import chaintune
from chaintune import testing
from chaintune.adapters import apply_lora
from chaintune.estimators.per_sample import PerSampleGradients

MODELS = testing.TINY_MODELS
STEPS, N = 3, 4


def _lora(model):
    apply_lora(model.denoiser, rank=2)
    g = torch.Generator().manual_seed(1)
    for p in model.denoiser.parameters():
        if p.requires_grad:  # LoRA B starts at 0: give both factors a gradient
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.denoiser.eval()  # DiT drops labels at random in train mode: two estimates would see different policies
    return model


def _estimate(model, est):
    """(gradient, denoiser calls, warnings) of one DDPO/GRPO estimate on fixed draws."""
    calls = []
    hook = model.denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = chaintune.estimate_gradient(model, testing.mean_reward(model), est, n=N, steps=STEPS,
                                            checkpoint=False, generator=torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    return g, len(calls), [str(w.message) for w in caught if "per-sample" in str(w.message)]


def _rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / (a[k].norm() + 1e-30)) for k in a)


@pytest.mark.parametrize("kind", list(MODELS))
def test_per_sample_gradients_equal_the_recomputed_first_epoch(kind):
    from chaintune.estimators import get_estimator

    model = _lora(MODELS[kind]())
    want, recomputed, _ = _estimate(model, get_estimator("reinforce"))
    got, gathered, warned = _estimate(model, get_estimator("reinforce", reuse_rollout="per-sample"))
    assert not warned
    assert sum(float(v.abs().sum()) for v in want.values()) > 0
    assert _rel(want, got) < 2e-5  # float32 rounding of a different summation order
    assert recomputed - gathered == STEPS - 1  # every trained step's second forward pass is gone


def test_grpo_per_sample_equals_recomputed():
    from chaintune.estimators import get_estimator

    model = _lora(testing.tiny_sd_model())
    want, _, _ = _estimate(model, get_estimator("grpo"))
    got, _, warned = _estimate(model, get_estimator("grpo", reuse_rollout="per-sample"))
    assert not warned and _rel(want, got) < 2e-5


class _Folded(nn.Module):
    """A toy denoiser that folds each sample's frames into the batch ([sample, frame] rows, as video UNets do):
    row r is not sample r mod n, so gathering by rows would be wrong."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x.reshape(-1, 8)).reshape(x.shape)  # [n, frames, 8] -> [(sample, frame), 8]


def test_rows_that_are_not_whole_copies_of_the_samples_are_caught():
    torch.manual_seed(0)
    net = _Folded()
    x = torch.randn(N, 2, 8)
    with PerSampleGradients(net, N) as acc:
        lp = -(net(x) ** 2).flatten(1).sum(1)
        assert acc.supported
        with pytest.warns(UserWarning, match="differ from autograd's"):
            assert acc.add(0, lp, check=True) is False
    assert not acc.grads and not acc.steps  # nothing was added


def test_per_sample_gradients_of_a_toy_layer_equal_a_loop_over_samples():
    """The independent computation: each sample's gradient by its own backward pass."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x = torch.randn(N, 7, 5)

    def lp_of(xs):
        return -(lin(xs) ** 2).sum(dim=(1, 2))

    with PerSampleGradients(lin, N) as acc:
        assert acc.add(0, lp_of(x), check=True)
        assert acc.add(1, lp_of(x * 0.5))  # a second step accumulates
    assert acc.steps == {0, 1}
    for k in range(N):
        gw, gb = torch.autograd.grad(lp_of(x[k:k + 1]).sum() + lp_of(x[k:k + 1] * 0.5).sum(), [lin.weight, lin.bias])
        torch.testing.assert_close(acc.grads[id(lin.weight)][k], gw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc.grads[id(lin.bias)][k], gb, rtol=1e-5, atol=1e-6)
    w = torch.randn(N)
    lin.weight.grad = None
    acc.combine(w)
    torch.testing.assert_close(lin.weight.grad, torch.einsum("k,koi->oi", w, acc.grads[id(lin.weight)]))


def test_trainable_tensors_outside_linear_layers_recompute():
    """A trainable convolution (full fine-tuning of a UNet) has no per-sample rule here: the estimator recomputes,
    with the same gradient and the same number of forward passes."""
    from chaintune.estimators import get_estimator

    model = testing.tiny_unet_model()
    model.denoiser.eval()
    assert not PerSampleGradients(model.denoiser, N).supported
    want, recomputed, _ = _estimate(model, get_estimator("reinforce"))
    got, calls, warned = _estimate(model, get_estimator("reinforce", reuse_rollout="per-sample"))
    assert not warned and calls == recomputed
    assert _rel(want, got) == 0


def test_align_with_per_sample_reuse_ends_at_the_recomputing_run(tmp_path):
    """Through the trainer (two DDPO steps, LoRA, builtin:digits): the same weights as recomputing."""
    from safetensors.torch import load_file

    from chaintune.align import AlignConfig, align

    base = dict(model="builtin:digits", reward="digit:3", steps=2, batch_size=4, sample_steps=4, eval_every=0,
                tensorboard=False, progress=False, report=False, final_model="last", estimator="reinforce",
                peft="lora", lora_rank=2, kl_weight=0.0)
    weights = {}
    for mode in ("off", "per-sample"):
        align(AlignConfig.from_dict(dict(base, reuse_rollout=mode, out=str(tmp_path / mode))))
        weights[mode] = load_file(tmp_path / mode / "adapter" / "adapter_model.safetensors")
    assert weights["off"]
    for k, v in weights["off"].items():
        torch.testing.assert_close(weights["per-sample"][k], v, rtol=1e-4, atol=1e-6)

