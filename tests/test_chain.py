"""The chain against diffusers' own schedulers, exact log-probs, and every gradient mode."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from chaintune.chain import (
    DeterministicStepError,
    StepGrad,
    gaussian_log_prob,
    log_prob,
    prepare_scheduler,
    run_chain,
    transition,
)
from chaintune.testing import tiny_unet

SHAPE = (3, 1, 8, 8)


def _schedulers():
    for pt in ("epsilon", "v_prediction", "sample"):
        for clip in (True, False):
            yield DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pt, clip_sample=clip), None
            for eta in (0.0, 0.3, 1.0):
                yield DDIMScheduler(beta_schedule="linear", prediction_type=pt, clip_sample=clip), eta
    yield DDPMScheduler(variance_type="fixed_large"), None
    yield DDIMScheduler(set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing"), 1.0


@pytest.mark.parametrize("sched,eta", list(_schedulers()))
def test_step_matches_diffusers(sched, eta):
    s = prepare_scheduler(sched, 20)
    g = torch.Generator().manual_seed(1)
    for t in s.timesteps:
        out = torch.randn(SHAPE, generator=g)
        x = torch.randn(SHAPE, generator=g) * 1.5
        mean, std, _ = transition(s, out, int(t), x, eta=eta or 0.0)
        if isinstance(s, DDIMScheduler):
            z = torch.randn(SHAPE, generator=g)
            ref = s.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        else:
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
            ref = s.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(mean + std * z, ref, rtol=1e-5, atol=1e-5)


def test_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(0)
    mean, x = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    std = torch.tensor(0.37)
    ref = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)


def test_trajectory_log_probs_are_exact_and_deterministic_steps_are_nan(tiny_unet_model, gen):
    m = tiny_unet_model
    sched = DDIMScheduler.from_config(m.scheduler.config)
    x_T = torch.randn(SHAPE, generator=gen)
    with torch.no_grad():
        tr = run_chain(m.denoise_fn(m.default_conditions(3)), sched, x_T, num_steps=6, eta=0.8, generator=gen)
    assert tr.log_probs.shape == (3, 6)
    assert tr.stochastic[:-1].all() and not tr.stochastic[-1]  # set_alpha_to_one: last step is noiseless
    assert torch.isnan(tr.log_probs[:, -1]).all()
    for i in range(5):
        ref = torch.distributions.Normal(tr.means[i], tr.stds[i]).log_prob(tr.latents[i + 1]).flatten(1).sum(1)
        torch.testing.assert_close(tr.log_probs[:, i], ref)
    # recomputing from the stored transition gives the same number
    s = prepare_scheduler(sched, 6)
    with torch.no_grad():
        lp = log_prob(m.denoise_fn(m.default_conditions(3)), s, tr.latents[2], int(tr.timesteps[2]), tr.latents[3], 0.8)
    torch.testing.assert_close(lp, tr.log_probs[:, 2], rtol=1e-4, atol=1e-3)


def test_eta_zero_is_deterministic_and_refuses_log_probs(tiny_unet_model):
    m = tiny_unet_model
    sched = DDIMScheduler.from_config(m.scheduler.config)
    fn = m.denoise_fn(m.default_conditions(2))
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = run_chain(fn, sched, x_T, num_steps=5, eta=0.0, generator=torch.Generator().manual_seed(1))
        b = run_chain(fn, sched, x_T, num_steps=5, eta=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.x0, b.x0)
    assert torch.isnan(a.log_probs).all() and not a.stochastic.any()
    with pytest.raises(DeterministicStepError):
        log_prob(fn, prepare_scheduler(sched, 5), a.latents[0], int(a.timesteps[0]), a.latents[1], eta=0.0)
    with pytest.raises(DeterministicStepError):
        run_chain(fn, sched, x_T, num_steps=5, eta=0.0, modes=StepGrad.LIKELIHOOD)


def _double_model():
    from chaintune.backends.unet import UNetModel

    unet = tiny_unet(seed=3).double()
    return UNetModel(unet, DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False))


def _fixed_run(m, modes, x_T, noises, **kw):
    return run_chain(m.denoise_fn(m.default_conditions(x_T.shape[0])), m.scheduler, x_T, num_steps=4,
                     eta=1.0, modes=modes, noises=noises, **kw)


def test_pathwise_gradient_matches_finite_difference():
    m = _double_model()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    w = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    p = m.denoiser.conv_out.bias
    f = lambda: (_fixed_run(m, StepGrad.PATHWISE, x_T, noises).x0 * w).sum()  # noqa: E731
    m.denoiser.zero_grad()
    f().backward()
    auto = p.grad[0].item()
    h = 1e-6
    with torch.no_grad():
        p[0] += h
        up = f().item()
        p[0] -= 2 * h
        down = f().item()
        p[0] += h
    assert auto == pytest.approx((up - down) / (2 * h), rel=1e-5)


def test_checkpointing_gives_the_same_gradient():
    m = _double_model()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    grads = []
    for ckpt in (False, True):
        m.denoiser.zero_grad()
        _fixed_run(m, StepGrad.PATHWISE, x_T, noises, checkpoint=ckpt).x0.square().sum().backward()
        grads.append(m.denoiser.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_none_mode_gives_no_gradient():
    m = _double_model()
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    tr = _fixed_run(m, StepGrad.NONE, x_T, None, generator=torch.Generator().manual_seed(0))
    assert not tr.x0.requires_grad and not tr.graph_log_probs


def test_likelihood_mode_detaches_sample_and_differentiates_log_prob():
    m = _double_model()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    modes = ["none", "likelihood", "none", "none"]
    tr = _fixed_run(m, modes, x_T, noises)
    assert not tr.x0.requires_grad and set(tr.graph_log_probs) == {1}
    p = m.denoiser.conv_out.bias
    m.denoiser.zero_grad()
    tr.graph_log_probs[1].sum().backward()
    auto = p.grad[0].item()
    s = prepare_scheduler(m.scheduler, 4)
    fn = m.denoise_fn(m.default_conditions(2))

    def f():
        with torch.no_grad():
            return log_prob(fn, s, tr.latents[1], int(tr.timesteps[1]), tr.latents[2], 1.0).sum().item()

    h = 1e-6
    with torch.no_grad():
        p[0] += h
    up = f()
    with torch.no_grad():
        p[0] -= 2 * h
    down = f()
    with torch.no_grad():
        p[0] += h
    assert auto == pytest.approx((up - down) / (2 * h), rel=1e-4)


def test_half_order_span_backpropagates_into_earlier_steps():
    """pathwise -> likelihood: the log-prob of the last span step depends on the first step's parameters."""
    m = _double_model()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    span = _fixed_run(m, ["pathwise", "likelihood", "none", "none"], x_T, noises)
    single = _fixed_run(m, ["none", "likelihood", "none", "none"], x_T, noises)
    torch.testing.assert_close(span.graph_log_probs[1], single.graph_log_probs[1])  # same value
    (ga,) = torch.autograd.grad(span.graph_log_probs[1].sum(), m.denoiser.conv_out.bias)
    (gb,) = torch.autograd.grad(single.graph_log_probs[1].sum(), m.denoiser.conv_out.bias)
    assert not torch.allclose(ga, gb)  # the span adds the first step's contribution


def test_perturbed_mode_runs_inside_the_context():
    m = _double_model()
    entered = []
    p = m.denoiser.conv_out.bias

    class Shift:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            entered.append(self.i)
            p.data += 0.5

        def __exit__(self, *a):
            p.data -= 0.5

    x_T = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    noises = [torch.randn(1, 1, 8, 8, dtype=torch.float64) for _ in range(4)]
    pert = _fixed_run(m, ["perturbed", "none", "perturbed", "none"], x_T, noises, perturb=Shift)
    plain = _fixed_run(m, "none", x_T, noises)
    assert entered == [0, 2]
    assert not torch.allclose(pert.x0, plain.x0)
    with torch.no_grad():
        p += 0.5
    shifted_first = _fixed_run(m, "none", x_T, noises)
    with torch.no_grad():
        p -= 0.5
    torch.testing.assert_close(pert.latents[1], shifted_first.latents[1])


def test_stop_at_returns_predicted_x0(tiny_unet_model):
    m = tiny_unet_model
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    tr = run_chain(m.denoise_fn(m.default_conditions(2)), m.scheduler, x_T, num_steps=6, eta=1.0,
                   generator=torch.Generator().manual_seed(1), modes="pathwise", stop_at=3)
    assert tr.num_steps == 4 and tr.x0.requires_grad
    torch.testing.assert_close(tr.x0.detach(), tr.pred_x0[3])
