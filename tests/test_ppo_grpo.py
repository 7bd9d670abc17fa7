"""PPO on per-dimension log-probs (DDPO's convention), GRPO / DDPO baselines, the grpo estimator with its
KL to the reference policy, and the authors' released RLR against eq. 6."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler

import chaintune
from chaintune.backends.base import Conditions
from chaintune.chain import run_chain
from chaintune.errors import ChaintuneError
from chaintune.estimators import GRPO, RLR, EstimationContext, Reinforce, RLRReleased, advantages
from chaintune.estimators.base import draw_noise
from chaintune.estimators.baselines import PerPromptStatTracker
from chaintune.rewards import FunctionReward
from chaintune.testing import tiny_flow_model, tiny_unet_model

STEPS, N, ETA = 4, 6, 1.0
_TARGET = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
REWARD = FunctionReward(lambda images: -((images.double() - _TARGET) ** 2).flatten(1).mean(1), differentiable=True,
                        name="smooth")
BLACKBOX = FunctionReward(lambda images: images.float().mean((1, 2, 3)), differentiable=False, name="mean")


@pytest.fixture(scope="module")
def unet():
    model = tiny_unet_model()
    model.denoiser.double()
    return model


def _ctx(model, seed: int, reward=REWARD, n: int = N, **kw) -> EstimationContext:
    return EstimationContext(model=model, reward=reward, n=n, steps=STEPS, eta=ETA,
                             generator=torch.Generator().manual_seed(seed), **kw)


# ------------------------------------------------------------------------------------------ PPO


def _ddpo_step_log_probs(model, latents, eta):
    """DDPO's ``ddim_step_with_logprob`` by hand: the mean from diffusers' DDIMScheduler.step (zero noise),
    std = eta * sqrt(variance), log N averaged over the latent dimensions. One [n] tensor per stochastic step."""
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(STEPS)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # diffusers keeps them in float32; the chain uses float64
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
    out = []
    for i, t in enumerate(sched.timesteps[:-1]):  # the last DDIM step (alpha_prev = 1) is deterministic
        x = latents[i]
        eps = model.denoiser(x, t).sample
        mean = sched.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        std = eta * sched._get_variance(t, prev_t).double() ** 0.5
        lp = (-((latents[i + 1] - mean) ** 2) / (2 * std**2) - torch.log(std)
              - torch.log(torch.sqrt(2 * torch.as_tensor(torch.pi, dtype=torch.float64))))
        out.append(lp.mean(dim=tuple(range(1, lp.ndim))))
    return out


def _ddpo_loss(adv, new_lps, old_lps, eps):
    """DDPO's loss and clipfrac, averaged over timesteps as ddpo-pytorch logs them."""
    losses, fracs = [], []
    for new, old in zip(new_lps, old_lps, strict=True):
        ratio = torch.exp(new - old)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
        losses.append(torch.mean(torch.maximum(unclipped, clipped)))
        fracs.append(torch.mean((torch.abs(ratio - 1.0) > eps).double()))
    return losses, torch.stack(fracs).mean()


def test_ppo_ratio_and_loss_match_ddpo_after_a_step(unet):
    """After a parameter step, chaintune's clip fraction, loss and gradient are DDPO's (per-dimension ratio),
    the gradient scaled by D so that the first epoch stays the unbiased sum-form estimate."""
    model, seed, eps = unet, 7, 1e-4
    # the stored trajectory, replayed independently from the same seed (the estimator draws x_T and noise first)
    ref = _ctx(model, seed, reward=BLACKBOX)
    x_T, noises = draw_noise(ref, N)
    with torch.no_grad():
        traj = run_chain(model.denoise_fn(ref.conditions), ref.scheduler, x_T, num_steps=STEPS, eta=ETA, noises=noises)
        r = BLACKBOX(model.decode(traj.x0)).float()  # float32 rewards, as DDPO's
        old_lps = _ddpo_step_log_probs(model, traj.latents, ETA)
    loo = r - (r.sum() - r) / (N - 1)  # leave-one-out baseline, normalised by the batch std, clipped at 5
    adv = (loo / (r.std() + 1e-8)).clamp(-5, 5).double()

    ctx = _ctx(model, seed, reward=BLACKBOX)
    params = [p for _, p in ctx.params]
    saved = [p.detach().clone() for p in params]
    est = Reinforce(inner_epochs=2, clip_range=eps)
    it = est.updates(ctx)
    try:
        s0 = next(it)
        assert s0.extra["clip_frac"] == 0.0
        g = torch.cat([p.grad.flatten() for p in params])
        with torch.no_grad():  # an optimizer-like step of norm 2e-4 along the estimate
            for p in params:
                p.sub_(2e-4 * p.grad / g.norm())
                p.grad = None
        s1 = next(it)
        with torch.no_grad():
            new_lps = _ddpo_step_log_probs(model, traj.latents, ETA)
        losses, clipfrac = _ddpo_loss(adv, new_lps, old_lps, eps)
        assert 0.0 < float(clipfrac) < 1.0, float(clipfrac)  # the update is inside DDPO's trust region for some
        assert abs(s1.extra["clip_frac"] - float(clipfrac)) < 1e-6
        assert abs(s1.extra["ppo_loss"] - float(torch.stack(losses).mean())) < 1e-6
        # gradient: D * sum over positions of DDPO's loss
        with torch.enable_grad():
            new_lps = _ddpo_step_log_probs(model, traj.latents, ETA)
            losses, _ = _ddpo_loss(adv, new_lps, old_lps, eps)
            d = traj.latents[0][0].numel()
            hand = torch.autograd.grad(d * torch.stack(losses).sum(), params, allow_unused=True)
        for p, h in zip(params, hand, strict=True):
            h = torch.zeros_like(p) if h is None else h
            torch.testing.assert_close(p.grad, h, rtol=1e-6, atol=1e-9)
    finally:
        it.close()
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None


def test_ppo_first_epoch_is_the_sum_form_likelihood_ratio(unet):
    """At ratio = 1 the backpropagated D * loss is exactly sum_i A * grad log p_i (summed log-prob)."""
    from chaintune.chain import log_prob, prepare_scheduler

    model = unet
    ctx = _ctx(model, 3, reward=BLACKBOX)
    grads = chaintune.estimate_gradient(model, BLACKBOX, Reinforce(), n=N, steps=STEPS, eta=ETA,
                                        generator=torch.Generator().manual_seed(3))
    x_T, noises = draw_noise(ctx, N)
    with torch.no_grad():
        traj = run_chain(model.denoise_fn(ctx.conditions), ctx.scheduler, x_T, num_steps=STEPS, eta=ETA, noises=noises)
        r = BLACKBOX(model.decode(traj.x0))
    adv = advantages(r, ctx.conditions, "batch", normalize=True).clamp(-5, 5).double()
    sched = prepare_scheduler(ctx.scheduler, STEPS)
    surrogate = sum((adv * log_prob(model.denoise_fn(ctx.conditions), sched, traj.latents[i], int(traj.timesteps[i]),
                                    traj.latents[i + 1], ETA)).mean() for i in range(STEPS - 1))
    names = [k for k, _ in ctx.params]
    hand = torch.autograd.grad(surrogate, [p for _, p in ctx.params])
    for k, h in zip(names, hand, strict=True):
        torch.testing.assert_close(grads[k], h, rtol=1e-6, atol=1e-10)


# ------------------------------------------------------------------------------------ baselines


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0])
    prompts = ["a", "a", "b", "b", "c"]
    adv = advantages(r, Conditions(prompts=prompts), "group")
    # group a: mean 2, population std 1; group b: mean 4, std 2; group c alone: 0
    expect = torch.tensor([(1 - 2) / (1 + 1e-4), (3 - 2) / (1 + 1e-4), (2 - 4) / (2 + 1e-4), (6 - 4) / (2 + 1e-4), 0.0])
    torch.testing.assert_close(adv, expect)
    by_label = advantages(r, Conditions(labels=torch.tensor([0, 0, 1, 1, 2])), "group")
    torch.testing.assert_close(by_label, expect)
    whole = advantages(r, None, "group")  # unconditional: one group
    torch.testing.assert_close(whole, (r - r.mean()) / (r.std(unbiased=False) + 1e-4))
    with pytest.raises(ChaintuneError, match="baseline must be one of"):
        advantages(r, None, "median")


def test_per_prompt_stat_tracker_by_hand():
    tr = PerPromptStatTracker(buffer_size=3, min_count=2)
    cond = Conditions(prompts=["a", "b"])
    # step 1: each prompt has 1 buffered reward < min_count -> batch statistics
    r1 = torch.tensor([1.0, 5.0])
    a1 = advantages(r1, cond, "tracker", tracker=tr)
    torch.testing.assert_close(a1, (r1 - 3.0) / (2.0 + 1e-6))
    # step 2: a's buffer [1, 3] (count 2 = min_count) -> its own stats; b likewise [5, 9]
    r2 = torch.tensor([3.0, 9.0])
    a2 = advantages(r2, cond, "tracker", tracker=tr)
    torch.testing.assert_close(a2, torch.tensor([(3 - 2) / (1 + 1e-6), (9 - 7) / (2 + 1e-6)]))
    # steps 3-4 on 'a' only: the buffer keeps the last 3 rewards
    advantages(torch.tensor([5.0]), Conditions(prompts=["a"]), "tracker", tracker=tr)
    a4 = advantages(torch.tensor([7.0]), Conditions(prompts=["a"]), "tracker", tracker=tr)
    buf = torch.tensor([3.0, 5.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(a4, ((7 - buf.mean()) / (buf.std(unbiased=False) + 1e-6)).float().reshape(1))
    # state survives a JSON round trip (the trainer's checkpoint) and resumes identically
    tr2 = PerPromptStatTracker(3, 2)
    tr2.load_state_dict(json.loads(json.dumps(tr.state_dict())))
    r5 = torch.tensor([4.0, 6.0])
    torch.testing.assert_close(tr2.update(["a", "b"], r5), tr.update(["a", "b"], r5))
    with pytest.raises(ChaintuneError, match="tracker"):
        advantages(r1, cond, "tracker")


def test_estimator_state_dict_carries_the_tracker(unet):
    est = Reinforce()
    assert est.state_dict() == {}
    chaintune.estimate_gradient(unet, BLACKBOX, est, n=4, steps=3, baseline="tracker",
                                generator=torch.Generator().manual_seed(0))
    state = json.loads(json.dumps(est.state_dict()))
    assert len(state["stat_tracker"]["stats"][""]) == 4
    fresh = Reinforce()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    rlr = RLR(j="grad-norm")
    rlr._norms = {3: 0.5}
    back = RLR(j="grad-norm")
    back.load_state_dict(json.loads(json.dumps(rlr.state_dict())))
    assert back._norms == {3: 0.5}


# ------------------------------------------------------------------------------------------ GRPO


@contextlib.contextmanager
def _swap(model, denoiser):
    live = model.denoiser
    model.denoiser = denoiser
    try:
        yield
    finally:
        model.denoiser = live


def _grad(ctx, est):
    params = [p for _, p in ctx.params]
    for p in params:
        p.grad = None
    stats = next(iter(est.updates(ctx)))
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out, stats


def test_grpo_on_unet_kl_zero_at_the_reference(unet):
    frozen = copy.deepcopy(unet.denoiser).requires_grad_(False)
    g0, _ = _grad(_ctx(unet, 11, reward=BLACKBOX), GRPO())
    g1, s1 = _grad(_ctx(unet, 11, reward=BLACKBOX, reference=lambda: _swap(unet, frozen)), GRPO(kl_coef=0.5))
    assert all(torch.isfinite(g).all() for g in g0) and any(g.abs().sum() > 0 for g in g0)
    assert s1.extra["kl"] == 0.0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a reference that differs gives a positive KL and changes the gradient
    other = copy.deepcopy(frozen)
    with torch.no_grad():
        other.conv_out.bias.add_(0.05)
    g2, s2 = _grad(_ctx(unet, 11, reward=BLACKBOX, reference=lambda: _swap(unet, other)), GRPO(kl_coef=0.5))
    assert s2.extra["kl"] > 0 and any(not torch.equal(a, b) for a, b in zip(g0, g2, strict=True))
    with pytest.raises(ChaintuneError, match="reference"):
        next(iter(GRPO(kl_coef=0.1).updates(_ctx(unet, 0, reward=BLACKBOX))))


def test_grpo_on_flow_model_with_groups():
    model = tiny_flow_model()
    reward = FunctionReward(lambda images: images.float().mean((1, 2, 3)), differentiable=False, name="mean")
    frozen = copy.deepcopy(model.denoiser).requires_grad_(False)
    cond = Conditions(prompts=["a cat", "a cat", "a dog", "a dog"])
    ctx = EstimationContext(model=model, reward=reward, n=4, steps=3, eta=0.7, conditions=cond,
                            generator=torch.Generator().manual_seed(0), reference=lambda: _swap(model, frozen))
    g, stats = _grad(ctx, GRPO(kl_coef=0.04))
    assert all(torch.isfinite(x).all() for x in g) and any(x.abs().sum() > 0 for x in g)
    assert stats.extra["kl"] == 0.0 and stats.extra["clip_frac"] == 0.0


# ------------------------------------------------------------------------------ released RLR


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rlr_released_defaults_equal_rlr_h1_bit_for_bit(unet, seed):
    kw = dict(n=4, steps=STEPS, eta=ETA)
    a = chaintune.estimate_gradient(unet, REWARD, "rlr-released", generator=torch.Generator().manual_seed(seed), **kw)
    b = chaintune.estimate_gradient(unet, REWARD, RLR(h=1, spans=1, zo=False),
                                    generator=torch.Generator().manual_seed(seed), **kw)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rlr_released_options(unet):
    kw = dict(n=4, steps=STEPS, eta=ETA)

    def grad(est, seed=5):
        return chaintune.estimate_gradient(unet, REWARD, est, generator=torch.Generator().manual_seed(seed), **kw)

    base = grad(RLRReleased())
    # on-policy the PPO ratio is exactly 1: the clipped form gives the plain term's gradient
    clipped = grad(RLRReleased(lr_clip_range=1e-4))
    for k in base:
        torch.testing.assert_close(clipped[k], base[k], rtol=1e-6, atol=1e-12)
    # this DDIM chain's last step is already deterministic, so running it at eta = 0 changes nothing
    fin = grad(RLRReleased(final_eta=0.0))
    for k in base:
        torch.testing.assert_close(fin[k], base[k], rtol=1e-6, atol=1e-12)
    # coefficients scale the two terms: fo_coef = 0 and lr_coef = 0 leave nothing
    zero = grad(RLRReleased(fo_coef=0.0, lr_coef=0.0))
    assert all(v.abs().max() == 0 for v in zero.values())
    # chain_len = 2 (the release's script), with every option on, runs and is finite
    full = grad(RLRReleased(chain_len=2, final_eta=0.0, lr_clip_range=1e-4, fo_coef=1.0, lr_coef=0.5))
    assert all(torch.isfinite(v).all() for v in full.values())
    with pytest.raises(ChaintuneError, match="not differentiable"):
        chaintune.estimate_gradient(unet, BLACKBOX, "rlr-released", **kw)


def test_rlr_released_final_eta_on_a_flow_model():
    """Flow chains are stochastic to the last step: final_eta = 0 makes that step deterministic (Euler)."""
    model = tiny_flow_model()
    reward = FunctionReward(lambda images: -(images.float() ** 2).mean((1, 2, 3)), differentiable=True, name="sq")
    kw = dict(n=2, steps=3, eta=0.7, prompts=["a cat", "a dog"])
    a = chaintune.estimate_gradient(model, reward, RLRReleased(), generator=torch.Generator().manual_seed(0), **kw)
    b = chaintune.estimate_gradient(model, reward, RLRReleased(final_eta=0.0),
                                    generator=torch.Generator().manual_seed(0), **kw)
    assert all(torch.isfinite(v).all() for v in b.values())
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_config_passes_the_new_options():
    from chaintune.align import estimator_from_config
    from chaintune.align.config import AlignConfig

    est = estimator_from_config(AlignConfig.from_dict({"estimator": "grpo", "kl_coef": 0.04, "inner_epochs": 2}))
    assert isinstance(est, GRPO) and est.kl_coef == 0.04 and est.inner_epochs == 2
    est = estimator_from_config(AlignConfig.from_dict({"estimator": "rlr-released", "chain_len": 2, "final_eta": 0.0,
                                                       "lr_clip_range": 1e-4, "lr_coef": 0.5}))
    assert (est.chain_len, est.final_eta, est.lr_clip_range, est.lr_coef) == (2, 0.0, 1e-4, 0.5)
    est = estimator_from_config(AlignConfig.from_dict({"estimator": "reinforce", "baseline": "tracker",
                                                       "tracker_buffer": 32, "tracker_min_count": 8}))
    assert est._tracker.buffer_size == 32 and est._tracker.min_count == 8


def _flow_grpo_advantages(prompts, rewards, global_std, per_prompt=True):
    """Flow-GRPO's PerPromptStatTracker.update (type 'grpo', a fresh tracker: the train script clears it every epoch)
    and its batch z-score when per-prompt tracking is off (num_image_per_prompt == 1), written from its source."""
    import numpy as np

    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    if not per_prompt:
        return (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    adv = np.zeros_like(rewards)
    for p in np.unique(prompts):
        r = rewards[prompts == p]
        std = (rewards.std() if global_std else r.std()) + 1e-4
        adv[prompts == p] = (r - r.mean()) / std
    return adv


@pytest.mark.parametrize("global_std", [True, False])
def test_grpo_advantages_equal_flow_grpos(global_std):
    from chaintune.estimators import GRPO
    from chaintune.estimators.baselines import group_normalized

    g = torch.Generator().manual_seed(0)
    prompts = [p for p in ("a cat", "a dog", "a fox") for _ in range(4)]
    rewards = torch.randn(12, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).repeat_interleave(4)
    want = torch.tensor(_flow_grpo_advantages(prompts, rewards.numpy(), global_std), dtype=torch.float32)
    torch.testing.assert_close(group_normalized(rewards, prompts, global_std=global_std), want)
    est = GRPO(global_std=global_std)
    torch.testing.assert_close(est.step_advantages(rewards, prompts), want.clamp(-5, 5))
    # one sample per prompt: Flow-GRPO switches per-prompt tracking off and z-scores the batch (chaintune used to
    # give every such sample advantage 0, no learning signal at all)
    single = [f"prompt {i}" for i in range(12)]
    want1 = torch.tensor(_flow_grpo_advantages(single, rewards.numpy(), global_std, per_prompt=False),
                         dtype=torch.float32)
    torch.testing.assert_close(group_normalized(rewards, single, global_std=global_std), want1)
    assert GRPO().global_std is True  # Flow-GRPO's config_base default (and its SD3 recipes')


def test_grpo_flow_grpo_kl_form_is_flow_grpos_formula():
    """kl_form='flow-grpo' is Flow-GRPO's `((mean - mean_ref)**2).mean(dims) / (2 * std_dev_t**2)` with
    std_dev_t = eta * sqrt(sigma / (1 - sigma)) (sigma_max for sigma = 1), summed over the latent dimensions as every
    chaintune loss is; written here from Flow-GRPO's formula, on the same trajectory."""
    from chaintune.chain import StepGrad, prepare_scheduler, transition
    from chaintune.estimators.base import rollout
    from chaintune.sampling import chain_scheduler

    model = tiny_flow_model()
    other = copy.deepcopy(model.denoiser).requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ctx = EstimationContext(model=model, reward=BLACKBOX, n=2, steps=3, eta=0.7,
                            generator=torch.Generator().manual_seed(0), reference=lambda: _swap(model, other))
    x_T, noises = draw_noise(ctx, 2)
    sched = prepare_scheduler(chain_scheduler(model, "ddim"), 3)
    ctx.scheduler = sched
    with torch.no_grad():
        traj, _, _ = rollout(ctx, StepGrad.NONE, x_T=x_T, noises=noises, cond=ctx.conditions)
    denoise = model.denoise_fn(ctx.conditions)
    sigmas = sched.sigmas
    for i in range(3):
        x, t = traj.latents[i], traj.timesteps[i]
        with torch.no_grad():
            mean, std, _ = transition(sched, denoise(x, t), t, x, 0.7)
            with _swap(model, other):
                ref_mean, _, _ = transition(sched, model.denoise_fn(ctx.conditions)(x, t), t, x, 0.7)
            ours = GRPO(kl_coef=1.0, kl_form="flow-grpo")._penalty(ctx, denoise, sched, traj, i, mean, std)
            exact = GRPO(kl_coef=1.0)._penalty(ctx, denoise, sched, traj, i, mean, std)
        s = float(sigmas[i])
        s_for_g = float(sigmas[1]) if s >= 1 else s
        std_dev_t = 0.7 * (s / (1 - s_for_g)) ** 0.5
        flow_grpo = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)  # per dimension, per sample
        dims = mean[0].numel()
        assert float(ours) == pytest.approx(float((flow_grpo * dims).mean()), rel=1e-4)
        assert float(ours) == pytest.approx(float(exact) * (s - float(sigmas[i + 1])), rel=1e-4)  # = exact * |ds|
    with pytest.raises(ChaintuneError, match="flow SDE"):
        next(iter(GRPO(kl_coef=0.1, kl_form="flow-grpo").updates(_ctx(tiny_unet_model(), 0, reward=BLACKBOX,
                                                                          reference=contextlib.nullcontext))))


def test_align_samples_and_scores_with_one_policy_on_dit(tmp_path):
    """DiT's label embedding drops 10% of class labels in train mode: if align ran the denoiser in train mode, the
    first PPO epoch's log-probs would come from another policy than the sampling one (approx_kl > 0 at ratio 1)."""
    from chaintune.align import AlignConfig, align, read_metrics
    from chaintune.testing import tiny_dit_model

    model_dir = tmp_path / "dit"
    tiny_dit_model().save(model_dir)
    out = tmp_path / "run"
    align(AlignConfig.from_dict(dict(model=str(model_dir), reward="jpeg-compressibility", estimator="reinforce",
                                     inner_epochs=1, steps=2, batch_size=8, sample_steps=3, eval_every=0,
                                     eval_samples=4, guidance_scale=1.0, tensorboard=False, progress=False,
                                     report=False, save_every=0, out=str(out))))
    rows = [r for r in read_metrics(out) if "approx_kl" in r]
    assert len(rows) == 2 and all(r["approx_kl"] == 0.0 and r["clip_frac"] == 0.0 for r in rows)
