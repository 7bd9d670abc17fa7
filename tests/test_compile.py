"""``--compile``: compiled gradients equal eager's on every backend, and a compiler that changes them is refused."""

from __future__ import annotations

import json

import pytest
import torch

import chaintune
from chaintune import testing
from chaintune.run.compiled import compile_denoiser, gradient_mismatch

MODELS = testing.TINY_MODELS


def _grads(model, checkpoint: bool) -> dict[str, torch.Tensor]:
    """Full backprop through a 3-step chain: every denoiser call's backward is in it."""
    reward = testing.mean_reward(model)
    return chaintune.estimate_gradient(model, reward, "full-backprop", n=2, steps=3, checkpoint=checkpoint,
                                       generator=torch.Generator().manual_seed(3))


def test_gradient_mismatch_finds_a_changed_tensor_and_ignores_rounding():
    g = torch.Generator().manual_seed(0)
    eager = {"a": torch.randn(50, generator=g), "b": torch.randn(50, generator=g), "key_bias": torch.zeros(4) + 1e-9}
    rounded = {k: v * (1 + 1e-6) for k, v in eager.items()}
    rounded["key_bias"] = torch.full((4,), 3e-9)  # relative error 2 on a tensor whose gradient is ~0: rounding
    assert gradient_mismatch(eager, rounded, rtol=1e-3) is None
    broken = dict(rounded, b=eager["b"] * 1.01)
    assert gradient_mismatch(eager, broken, rtol=1e-3)[0] == "b"
    assert gradient_mismatch(eager, dict(rounded, a=torch.zeros(50)), rtol=1e-3) == ("a", pytest.approx(1.0))


@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_chain_gradients_equal_eager_on_every_backend(kind):
    """aot_eager traces the same graphs as inductor (dynamo + AOT autograd, the joint forward/backward graph) without
    generating kernels: what --compile changes about the chain, at CI speed. Inductor: the slow test below."""
    torch._dynamo.reset()
    model = MODELS[kind]()
    model.denoiser.eval()  # as align runs it (DiT drops labels at random in train mode)
    eager = {c: _grads(model, c) for c in (False, True)}
    assert compile_denoiser(model, "aot_eager", batch_size=2, warn=pytest.fail)
    assert model.denoiser._compiled_call_impl is not None
    for c in (False, True):
        assert gradient_mismatch(eager[c], _grads(model, c), rtol=1e-4) is None, (kind, "checkpoint", c)


def test_a_compiler_that_changes_gradients_is_refused(capsys):
    """A backend whose graphs compute 1% more: the check must see it, warn, and leave the model eager."""
    torch._dynamo.reset()

    def off_by_one_percent(gm, example_inputs):
        def run(*args):
            out = gm(*args)
            return [o * 1.01 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out]
        return run

    model = testing.tiny_unet_model()
    eager = _grads(model, False)
    warnings: list[str] = []
    assert not compile_denoiser(model, off_by_one_percent, batch_size=2, warn=warnings.append)
    assert model.denoiser._compiled_call_impl is None
    assert len(warnings) == 1 and "changed the denoiser's gradients" in warnings[0]
    assert gradient_mismatch(eager, _grads(model, False), rtol=1e-6) is None  # eager again, exactly


def test_a_compiled_run_trains_as_the_eager_run(tmp_path):
    """Through the run skeleton (align, RLR): same weights after the steps, and the run records that it compiled."""
    from chaintune.align import AlignConfig, align

    torch._dynamo.reset()
    base = dict(model="builtin:digits", reward="digit:3", estimator="full-backprop", steps=2, batch_size=4,
                sample_steps=3, eval_every=0, eval_samples=4, tensorboard=False, progress=False, report=False,
                final_model="last", save_every=0)
    runs = {}
    for backend in ("none", "aot_eager"):
        out = tmp_path / backend
        align(AlignConfig.from_dict(dict(base, compile=backend, out=str(out))))
        runs[backend] = chaintune.load(str(out)).denoiser
        info = json.loads((out / "chaintune_run.json").read_text())
        assert info["compiled"] is (backend != "none")
    sd = {k: v for k, v in runs["none"].state_dict().items()}
    for k, v in runs["aot_eager"].state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_inductor_never_changes_the_gradients():
    """Inductor proper (C++ kernels on CPU): kept only where it agrees. On torch 2.13's CPU inductor the tiny
    UNet2DModel's fused backward is wrong (relative error ~0.4 on the input gradient); the check must catch that and
    fall back, so the gradients after compile_denoiser equal eager's either way."""
    torch._dynamo.reset()
    model = testing.tiny_unet_model()
    eager = _grads(model, True)
    compile_denoiser(model, "inductor", batch_size=2, warn=print)
    assert gradient_mismatch(eager, _grads(model, True), rtol=1e-3) is None
