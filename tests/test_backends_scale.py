"""Every backend x every estimator family on tiny offline pipelines; the flow-matching chain against
diffusers; prompt files and per-stage prompts (diffusive chain of thought)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import chaintune
from chaintune.adapters import apply_lora
from chaintune.chain import (
    DeterministicStepError,
    add_noise,
    log_prob,
    prepare_scheduler,
    run_chain,
    training_target,
    transition,
)
from chaintune.prompts import StagedModel, StagePrompts, load_prompts
from chaintune.rewards import FunctionReward
from chaintune.testing import tiny_dit_model, tiny_flow_model, tiny_sd_model, tiny_unet_model

BRIGHTNESS = FunctionReward(lambda images: images.mean(dim=(1, 2, 3)), differentiable=True, name="brightness")

# ---------------------------------------------------------------------------------------------
# flow matching: the chain's SDE step against diffusers' FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_eta_zero_is_diffusers_euler_step(shift):
    s = prepare_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift), 12)
    ref = prepare_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift), 12)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps:
        v, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        mean, std, x0 = transition(s, v, int(t), x, eta=0.0)
        assert float(std) == 0
        torch.testing.assert_close(mean, ref.step(v, t, x).prev_sample, rtol=0, atol=0)
        sigma = float(t) / 1000
        torch.testing.assert_close(x0, x - sigma * v, rtol=1e-5, atol=1e-5)


def test_flow_sde_keeps_the_ode_marginals():
    """Data N(0, c^2): the exact velocity is linear in x. The SDE (eta > 0) and the ODE must both end
    at std c, while the SDE's steps are genuinely noisy."""
    c = 0.5

    def velocity(x, t):
        s = float(t) / 1000
        var = (1 - s) ** 2 * c**2 + s**2
        return x * (s - (1 - s) * c**2) / var

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    x_T = torch.randn(8000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ends = {}
    for eta in (0.0, 0.7, 1.0):
        tr = run_chain(velocity, sched, x_T, num_steps=100, eta=eta, generator=torch.Generator().manual_seed(1))
        ends[eta] = tr.x0
        assert bool(tr.stochastic.all()) == (eta > 0)
        assert float(tr.x0.std()) == pytest.approx(c, rel=0.03)
    assert float((ends[0.7] - ends[0.0]).abs().mean()) > 0.1 * c  # same marginal, different paths


def test_flow_log_probs_are_exact_and_recomputable():
    m = tiny_flow_model()
    cond = m.default_conditions(2)
    fn = m.denoise_fn(cond)
    x_T = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tr = run_chain(fn, m.scheduler, x_T, num_steps=5, eta=0.7, generator=torch.Generator().manual_seed(1))
    assert tr.stochastic.all() and torch.isfinite(tr.log_probs).all()
    s = prepare_scheduler(m.scheduler, 5)
    for i in range(5):
        ref = torch.distributions.Normal(tr.means[i], tr.stds[i]).log_prob(tr.latents[i + 1]).flatten(1).sum(1)
        torch.testing.assert_close(tr.log_probs[:, i], ref)
        with torch.no_grad():  # estimators pass int(t): the model must still see the float timestep
            lp = log_prob(fn, s, tr.latents[i], int(tr.timesteps[i]), tr.latents[i + 1], 0.7)
        torch.testing.assert_close(lp, tr.log_probs[:, i], rtol=1e-4, atol=1e-3)
    with pytest.raises(DeterministicStepError):
        run_chain(fn, m.scheduler, x_T, num_steps=3, eta=0.0, modes="likelihood")


def test_flow_forward_process_and_target():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    xt = add_noise(sched, x0, noise, t)
    torch.testing.assert_close(xt[1], 0.5 * x0[1] + 0.5 * noise[1])
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(training_target(sched, x0, noise, t), noise - x0)


def test_flow_sampler_matches_stable_diffusion3_pipeline():
    m = tiny_flow_model()
    prompts = ["a red cube", "a blue ball"]
    tr = chaintune.sample(m, 2, steps=4, eta=0.0, prompts=prompts, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(0))
    ref = m.pipe(prompt=prompts, num_inference_steps=4, guidance_scale=3.0, latents=tr.latents[0], output_type="pt",
                 max_sequence_length=m.max_sequence_length, height=16, width=16).images
    torch.testing.assert_close(tr.images, ref, rtol=1e-5, atol=1e-5)


def test_flow_pipeline_saves_and_loads_with_vae_chunk(tmp_path):
    m = tiny_flow_model()
    m.save(tmp_path / "sd3")
    assert json.loads((tmp_path / "sd3" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    loaded = chaintune.load(tmp_path / "sd3", vae_chunk=1)
    assert loaded.kind == "flow" and loaded.vae_chunk == 1
    loaded.max_sequence_length = m.max_sequence_length
    kw = dict(steps=3, eta=0.5, prompts="a cat", guidance_scale=2.0)
    a = chaintune.sample(m, 3, generator=torch.Generator().manual_seed(0), **kw).images
    b = chaintune.sample(loaded, 3, generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b)  # chunked decoding changes nothing but peak memory


# ---------------------------------------------------------------------------------------------
# every backend x every estimator family: finite, non-zero LoRA gradients, offline

BACKENDS = {
    "unet": (lambda: tiny_unet_model(), {}),
    "sd": (tiny_sd_model, {"prompts": ["a cat", "a dog"], "guidance_scale": 3.0}),
    "dit": (tiny_dit_model, {"labels": [0, 3], "guidance_scale": 2.0}),
    "flow": (tiny_flow_model, {"prompts": ["a cat", "a dog"], "guidance_scale": 3.0}),
}
ESTIMATORS = {
    "full-backprop": {},
    "truncated-backprop": {"k": 2},
    "reinforce": {},
    "zeroth-order": {"sigma": 1e-2},
    "half-order": {"h": 2},
    "rlr": {"h": 2, "sigma": 1e-2},
}


@pytest.fixture(scope="module")
def lora_models():
    out = {}
    for name, (make, _) in BACKENDS.items():
        m = make()
        apply_lora(m.denoiser, rank=2)
        out[name] = m
    return out


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_estimator_gives_lora_gradients(lora_models, backend, estimator):
    m = lora_models[backend]
    cond_kw = BACKENDS[backend][1]
    grads = chaintune.estimate_gradient(m, BRIGHTNESS, estimator, n=2, steps=4, eta=1.0,
                                        generator=torch.Generator().manual_seed(0), **cond_kw,
                                        **ESTIMATORS[estimator])
    assert grads and all("lora_" in k for k in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    total = sum(float(g.abs().sum()) for k, g in grads.items() if "lora_B" in k)
    assert total > 0, f"{backend}/{estimator}: all LoRA gradients are zero"


# ---------------------------------------------------------------------------------------------
# prompts and diffusive chain of thought


def test_prompt_files_lists_functions_and_builtins(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# animals\na cat\n\n  a dog  \n")
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a fox"}, "an owl"]))
    assert load_prompts(txt).prompts == ["a cat", "a dog"]
    assert load_prompts(js).prompts == ["a fox", "an owl"]
    src = load_prompts(["x", "y", "z"])
    a = src.sample(6, torch.Generator().manual_seed(0))
    assert a == src.sample(6, torch.Generator().manual_seed(0)) and set(a) <= {"x", "y", "z"}
    assert load_prompts(lambda: ("a horse", {"meta": 1})).sample(2) == ["a horse", "a horse"]
    assert len(load_prompts("builtin:animals")) >= 10
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        load_prompts("builtin:nope")


def test_stage_prompts_switch_conditioning_by_chain_position():
    m = tiny_sd_model()
    steps = 6
    stages = StagePrompts(coarse="a red square", mid=None, fine=lambda p: p + ", detailed")
    staged = StagedModel(m, stages, steps=steps)
    cond = chaintune.sampling.make_conditions(m, 2, prompts=["a cat", "a dog"], guidance_scale=2.0)
    fn = staged.denoise_fn(cond)
    sched = prepare_scheduler(chaintune.sampling.chain_scheduler(m, "ddim"), steps)
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    expect = {0: ["a red square"] * 2, 1: ["a red square"] * 2, 2: ["a cat", "a dog"], 3: ["a cat", "a dog"],
              4: ["a cat, detailed", "a dog, detailed"], 5: ["a cat, detailed", "a dog, detailed"]}
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            direct = m.denoise_fn(chaintune.sampling.make_conditions(m, 2, prompts=expect[i], guidance_scale=2.0))
            torch.testing.assert_close(fn(x, t), direct(x, t))
    # without the sampler, positions come from the noise level (approximate near the boundaries)
    loose = [stages.stage_of_fraction(StagedModel(m, stages).fraction(t)) for t in sched.timesteps]
    assert loose[0] == "coarse" and loose[-1] == "fine" and loose.index("fine") > loose.index("mid")


def test_dcot_rlr_with_restricted_j_on_staged_model():
    m = tiny_sd_model()
    apply_lora(m.denoiser, rank=2)
    staged = StagedModel(m, StagePrompts(coarse="a blurry shape", fine="sharp details"), steps=8)
    js = set()
    for seed in range(4):
        grads, stats = chaintune.estimate_gradient(
            staged, BRIGHTNESS, "rlr", n=2, steps=8, eta=1.0, generator=torch.Generator().manual_seed(seed),
            prompts="a hand", guidance_scale=2.0, h=2, j=(4, 7), return_stats=True)
        js.add(stats.extra["j"])
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert js <= {4, 5, 6}  # the span j..j+h-1 stays inside paper steps [4, 7]


# ---------------------------------------------------------------------------------------------
# mixed precision and memory options


@pytest.mark.parametrize("backend", ["sd", "flow"])
def test_bf16_autocast_on_cpu_keeps_fp32_adapters(backend):
    from chaintune.estimators import EstimationContext, get_estimator
    from chaintune.sampling import chain_scheduler, make_conditions

    make, cond_kw = BACKENDS[backend]
    m = make()
    apply_lora(m.denoiser, rank=2)
    for est in ("full-backprop", "rlr"):
        ctx = EstimationContext(model=m, reward=BRIGHTNESS, n=2, steps=4, eta=1.0, scheduler=chain_scheduler(m, "ddim"),
                                generator=torch.Generator().manual_seed(0), conditions=make_conditions(m, 2, **cond_kw),
                                autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        m.denoiser.zero_grad(set_to_none=True)
        next(iter(get_estimator(est, **({"h": 2, "sigma": 1e-2} if est == "rlr" else {})).updates(ctx)))
        lora = [p for n, p in m.denoiser.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.float32 for p in lora)
        grads = [p.grad for p in lora if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_vae_chunk_decodes_identically():
    m = tiny_sd_model()
    z = torch.randn(5, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m.decode(z)
        m.vae_chunk = 2
        torch.testing.assert_close(m.decode(z), full, rtol=1e-5, atol=1e-6)


def test_make_optimizer_eight_bit_falls_back_with_a_warning():
    from chaintune.run.optim import eight_bit_available, make_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    assert type(make_optimizer([p], lr=1e-3, weight_decay=0.01)) is torch.optim.AdamW
    ok, why = eight_bit_available([p])
    if ok:  # pragma: no cover - only with CUDA + bitsandbytes
        pytest.skip("8-bit AdamW is usable here")
    with pytest.warns(RuntimeWarning, match="8-bit AdamW"):
        opt = make_optimizer([p], lr=1e-3, weight_decay=0.01, eight_bit=True)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError):
        make_optimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], lr=1e-3)


def test_cli_align_flow_pipeline_bf16_lora(tmp_path):
    """`chaintune align --mixed-precision bf16 --peft lora` on a saved SD3 pipeline, then load the run."""
    import os
    import subprocess
    import sys

    tiny_flow_model().save(tmp_path / "sd3")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chaintune.cli.main", "align", "--model", str(tmp_path / "sd3"),
           "--reward", "jpeg-compressibility", "--prompt", "a cat", "--prompt", "a dog", "--guidance-scale", "2",
           "--mixed-precision", "bf16", "--peft", "lora", "--estimator", "rlr", "--steps", "2", "--sample-steps", "4",
           "--batch-size", "4", "--eval-every", "100", "--eval-samples", "4", "--save-every", "100",
           "--no-tensorboard", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = chaintune.load(out)
    assert run.kind == "flow" and all(p.dtype == torch.float32 for p in run.denoiser.parameters())
    assert chaintune.sample(run, 2, steps=3, prompts="a cat").images.shape == (2, 3, 16, 16)


def test_staged_model_copies_do_not_touch_the_original():
    import copy

    m = tiny_sd_model()
    staged = StagedModel(m, StagePrompts(coarse="x"), steps=4)
    shallow = copy.copy(staged)
    shallow.denoiser = torch.nn.Identity()
    assert m.denoiser is not shallow.denoiser and staged.denoiser is m.denoiser
    deep = copy.deepcopy(staged)
    assert deep.denoiser is not m.denoiser and deep.stages.coarse == "x"
