"""``chaintune check``: minutes on the user's own model and reward before the GPU hours.

Each check runs the real code path on a small batch at the user's resolution and chain length and reports one line,
with what to change when it fails:

* **sampler** — chaintune's chain at eta 0 equals the model's own diffusers pipeline from the same initial latents
  (:meth:`~chaintune.backends.base.DiffusionModel.reference_images`); a model whose scheduler or conditioning was
  ported wrong samples differently here;
* **log-probs** — every stochastic step's log-prob is finite and, recomputed before any update, gives a PPO ratio of
  exactly 1 (the on-policy premise of DDPO, GRPO and the released RLR);
* **reward** — finite values, one per sample, and a gradient with respect to the images where the reward claims to be
  differentiable;
* **gradient** — one estimate of the chosen estimator reaches every trainable parameter (LoRA included) and is finite;
* **memory** — with ``memory``, the planner's probe: which estimator configurations fit, and the recommended one
  (:func:`chaintune.plan.recommend.recommend`), with where along the chain the reward is decided.

With ``controlnet`` (a ControlNet run, as ``align --controlnet`` takes it), the model is the ControlNet over its
frozen base: every sample follows a control drawn from the run's own data (``control_data``), the reward receives
them as ``metadata["control"]``, and the gradient check asks that the ControlNet's trainable tensors get one.

With ``data`` (what ``chaintune transfer --data`` would read), the transfer checks:

* **data** — the images load at the model's size, with how many classes;
* **bank** — the knowledge bank builds: base-model samples through the bank's own code path, finite;
* **features** — the FID features (``feature``; ``auto`` as ``transfer`` resolves it) load and give finite vectors
  of one size for data and bank images alike.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field

import torch

import chaintune
from chaintune.adapters import apply_peft
from chaintune.align.controls import ControlPool
from chaintune.align.objective import base_model_weights
from chaintune.backends.base import DiffusionModel
from chaintune.backends.controlled import load_controlled
from chaintune.chain import StepGrad, prepare_scheduler
from chaintune.errors import ChaintuneError
from chaintune.estimators import get_estimator
from chaintune.estimators.base import EstimationContext, draw_noise, rollout
from chaintune.estimators.ppo import step_log_prob
from chaintune.metrics import feature_network
from chaintune.plan.recommend import format_recommendation, recommend
from chaintune.prompts import load_prompts
from chaintune.rewards import get_reward, validate_reward_output
from chaintune.sampling import chain_scheduler, make_conditions
from chaintune.transfer.bank import build_bank
from chaintune.transfer.config import BankConfig
from chaintune.transfer.data import default_feature, load_target

SAMPLER_TOL = 1e-4  # images in [0, 1]: a ported scheduler or conditioning that differs moves them by far more


@dataclass
class Finding:
    """One check: passed (True), failed (False) or not applicable (None), what was seen, and what to change."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


@dataclass
class CheckReport:
    model: str
    reward: str
    estimator: str
    findings: list[Finding] = field(default_factory=list)
    recommendation: str = ""

    @property
    def ok(self) -> bool:
        return all(f.ok is not False for f in self.findings)


def check(model: str | DiffusionModel, reward=None, estimator: str = "rlr", memory: str | None = None,
          steps: int = 10, n: int = 2, prompts: list[str] | None = None, guidance_scale: float | None = None,
          peft: str = "lora", device: str | None = None, seed: int = 0, data: str | None = None,
          feature: str | None = "auto", controlnet: str | None = None, control_data: str = "auto") -> CheckReport:
    """Run the checks (module docstring) on ``model`` with ``reward`` (alignment) and/or ``data`` (transfer); each
    failure says what to change. A model passed in gets ``peft``'s adapters in place for the gradient check (pass a
    fresh one, or ``peft="none"`` to check the weights as they are). ``controlnet``: check reward fine-tuning of
    that ControlNet run (``model`` is read only for a bare ControlNetModel dir, as in ``align --controlnet``)."""
    if n < 2 or steps < 2:
        raise ChaintuneError(f"check needs n >= 2 samples and steps >= 2, got n={n}, steps={steps}")
    if reward is None and data is None:
        raise ChaintuneError("check what? give --reward (for align) and/or --data (for transfer)")
    rew = None if reward is None else get_reward(reward)  # an unknown reward is an input error, before the model loads
    model_id = model if isinstance(model, str) else (model.source or type(model).__name__)
    controls = None
    if controlnet is not None:
        model = load_controlled(controlnet, base=model if isinstance(model, str) else None, device=device)
        controls = ControlPool.load(model, controlnet, control_data)
        model_id = f"{controlnet} (ControlNet, {controls.kind} controls from {controls.data})"
    elif isinstance(model, str):
        model = chaintune.load(model, device=device)
    report = CheckReport(str(model_id), "" if rew is None else getattr(rew, "name", str(reward)), estimator)
    if data is not None:
        report.findings += _transfer_data(model, data, feature, steps, n, seed)
    if rew is None:
        return report
    gen = torch.Generator().manual_seed(seed)
    if prompts is None and model.takes_prompts and getattr(model, "default_prompts", None):
        pool = load_prompts(model.default_prompts).prompts  # the prompts the model ships, as align draws them
        prompts = [pool[int(i)] for i in torch.randint(len(pool), (n,), generator=gen)]
    cond = make_conditions(model, n, prompts=prompts, guidance_scale=guidance_scale, generator=gen)
    if controls is not None:  # each sample follows a control of the run's data, as align --controlnet draws them
        cond = dataclasses.replace(cond, control=controls.draw(n, gen).to(model.device))
    report.findings.append(_sampler(model, steps, n, seed, cond))
    images, lp_finding = _log_probs(model, rew, steps, n, cond, seed)
    report.findings.append(lp_finding)
    report.findings.append(_reward(rew, images, cond))
    report.findings.append(_gradient(model, rew, estimator, steps, n, cond, peft, seed))
    if memory is not None and controls is not None:
        report.findings.append(Finding("memory", None, "not planned for a ControlNet run (the planner measures base "
                                       "models); `chaintune plan` on its base gives an upper bound"))
    elif memory is not None and isinstance(model_id, str):
        try:
            rec = recommend(model_id, getattr(rew, "spec", None) or reward, memory, sample_steps=steps,
                            batch_size=n, peft=peft, device=device)
        except ChaintuneError as e:
            if "memory budget" not in str(e):
                raise
            report.findings.append(Finding("memory", False, str(e), "raise the budget or use --peft lora"))
            return report
        report.recommendation = format_recommendation(rec)
        fits = [o for o in rec.options if o.fits]
        report.findings.append(Finding(
            "memory", bool(fits),
            f"{len(fits)} of {len(rec.options)} estimator configurations fit {memory}"
            + (f"; recommended: {rec.choice.label}" if rec.choice else ""),
            "" if fits else "raise the budget, use --peft lora, fewer --sample-steps or a smaller batch"))
    return report


def _sampler(model: DiffusionModel, steps: int, n: int, seed: int, cond) -> Finding:
    tr = chaintune.sample(model, n, steps=steps, eta=0.0, generator=torch.Generator().manual_seed(seed),
                          conditions=cond)
    ref = model.reference_images(tr.latents[0], steps, cond)
    if ref is None:
        return Finding("sampler", None, f"{type(model).__name__}: no diffusers pipeline samples it from given latents "
                       "(its pipeline draws its own noise, or it has none): not compared; its scheduler step is "
                       "checked against diffusers' in chaintune's tests")
    diff = float((tr.images.float().cpu() - ref.float().cpu()).abs().max())
    if diff <= SAMPLER_TOL:
        return Finding("sampler", True, f"eta 0 from the same latents equals the diffusers pipeline (max |diff| "
                       f"{diff:.1e} over {n} samples, {steps} steps)")
    return Finding("sampler", False, f"chaintune's chain differs from the model's own pipeline: max |diff| {diff:.3g} "
                   f"(> {SAMPLER_TOL:g})", "the model's scheduler or conditioning does not match its pipeline: check "
                   "the scheduler config (betas, timestep spacing, prediction type, shift) and the text encoders")


def _log_probs(model, rew, steps, n, cond, seed) -> tuple[torch.Tensor, Finding]:
    ctx = EstimationContext(model=model, reward=lambda images, **_: images.float().flatten(1).mean(1), n=n,
                            steps=steps, eta=1.0, generator=torch.Generator().manual_seed(seed), conditions=cond)
    x_T, noises = draw_noise(ctx, n)
    with torch.no_grad():
        traj, images, _ = rollout(ctx, StepGrad.NONE, x_T=x_T, noises=noises, cond=cond)
        sched = prepare_scheduler(ctx.scheduler, steps, device=x_T.device)
        denoise = model.denoise_fn(cond)
        positions = [i for i, s in enumerate(traj.stochastic.tolist()) if s]
        dim = traj.latents[0][0].numel()
        worst, finite = 0.0, bool(torch.isfinite(traj.log_probs[:, positions]).all())
        for i in positions:
            lp, _, _ = step_log_prob(denoise, sched, traj.latents[i], traj.timesteps[i], traj.latents[i + 1], 1.0)
            ratio = torch.exp(lp.double() - traj.log_probs[:, i].double() / dim)
            worst = max(worst, float((ratio - 1).abs().max()))
    if not finite:
        return images, Finding("log-probs", False, "a stochastic step's log-prob is not finite",
                               "a step's std is zero or the model returns NaN: check eta and the model's dtype")
    if worst > 1e-6:
        return images, Finding("log-probs", False, f"the PPO ratio before an update is not 1 (max |ratio - 1| "
                                f"{worst:.2e})", "the denoiser is not deterministic between calls (dropout in "
                                "train mode? nondeterministic kernels?): PPO-style estimators would clip on noise")
    return images, Finding("log-probs", True, f"{len(positions)} stochastic steps, finite; PPO ratio before an "
                           f"update 1 (max |ratio - 1| {worst:.1e})")


def _reward(rew, images: torch.Tensor, cond) -> Finding:
    name = getattr(rew, "name", "reward")
    x = images.detach().clone().requires_grad_(True)
    try:
        r = validate_reward_output(rew(x, **cond.reward_kwargs()), x.shape[0], name)
    except ChaintuneError as e:
        return Finding("reward", False, str(e), "a reward that takes this model's samples (images or videos) and "
                       "prompts and returns one finite float per sample (shape [n])")
    if not getattr(rew, "differentiable", False):
        return Finding("reward", True, f"finite, shape [{x.shape[0]}]; black box (estimators that need no reward "
                       "gradient: rlr, reinforce/ddpo, grpo, nft, dpo, zeroth-order)")
    if not r.requires_grad:
        return Finding("reward", False, "marked differentiable, but its output has no graph to the images",
                       "compute it from the images with torch operations (no .detach(), numpy or PIL), or mark it "
                       "differentiable=False")
    (g,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
    if g is None or not bool(torch.isfinite(g).all()) or float(g.abs().sum()) == 0:
        return Finding("reward", False, "marked differentiable, but its gradient with respect to the images is "
                       + ("missing" if g is None else "zero or not finite"),
                       "check the reward's graph, or mark it differentiable=False")
    return Finding("reward", True, f"finite, shape [{x.shape[0]}], differentiable (gradient norm "
                   f"{float(g.norm()):.3g})")


def _gradient(model, rew, estimator, steps, n, cond, peft, seed) -> Finding:
    if peft != "none" and not any("lora_" in k for k, _ in model.denoiser.named_parameters()):
        apply_peft(model.denoiser, peft)  # peft none: the model's own requires_grad flags, as passed
    params = [(k, p) for k, p in model.denoiser.named_parameters() if p.requires_grad]
    if not params:
        return Finding("gradient", False, "no trainable parameters (every weight frozen)",
                       "unfreeze the adapters (requires_grad) or choose --peft")
    est = get_estimator(estimator)
    ctx = EstimationContext(model=model, reward=rew, n=n, steps=steps, eta=1.0, conditions=cond,
                            generator=torch.Generator().manual_seed(seed), scheduler=chain_scheduler(model, "ddim"),
                            reference=lambda: base_model_weights(model, None))  # adapters off: the base policy
    for _, p in params:
        p.grad = None
    try:
        next(iter(est.updates(ctx)))
    except ChaintuneError as e:
        return Finding("gradient", False, str(e), "choose an estimator the reward and model allow")
    missing = [k for k, p in params if p.grad is None]
    bad = [k for k, p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    norm = sum(float(p.grad.float().norm() ** 2) for _, p in params if p.grad is not None) ** 0.5
    for _, p in params:
        p.grad = None
    if missing or bad:
        what = f"{len(missing)} of {len(params)} trainable tensors get no gradient" if missing else \
            f"{len(bad)} trainable tensors get a non-finite gradient"
        return Finding("gradient", False, f"{estimator}: {what} (e.g. {(missing or bad)[0]})",
                       "the parameter is not on the path from the chain to the reward: check the adapters' targets "
                       "(--lora-targets) and the backend's denoiser" if missing else "lower the LR scale of the "
                       "model (mixed precision overflow?) or check the reward")
    if norm == 0:
        return Finding("gradient", False, f"{estimator}: the gradient is zero everywhere",
                       "the reward does not depend on the samples, or every advantage is zero (one sample per "
                       "prompt with grpo?)")
    return Finding("gradient", True, f"{estimator}: reaches all {len(params)} trainable tensors, finite (norm "
                   f"{norm:.3g})")


def _transfer_data(model: DiffusionModel, data: str, feature: str | None, steps: int, n: int,
                   seed: int) -> list[Finding]:
    """The data, bank and features checks (module docstring)."""
    try:
        x, y = load_target(model, data)
    except ChaintuneError as e:
        return [Finding("data", False, str(e), "give a folder of images (one subfolder per class), or digits:train")]
    classes = len(torch.unique(y)) if y is not None and len(y) else 0
    found = [Finding("data", bool(len(x)), f"{data}: {len(x)} images {list(x.shape[1:])}"
                     + (f", {classes} classes" if classes else ""), "" if len(x) else "the data holds no images")]
    with tempfile.TemporaryDirectory() as root:
        bank = build_bank(model, BankConfig(size=n, steps=steps, seed=seed), root=root)
    finite = bool(torch.isfinite(bank.latents).all() and torch.isfinite(bank.images).all())
    found.append(Finding("bank", finite, f"{len(bank)} base-model samples on the bank's path, "
                         + ("finite" if finite else "NOT finite"),
                         "" if finite else "the base model samples NaN/inf: check its weights and dtype"))
    name = default_feature(data) if feature == "auto" else feature
    if not name:
        found.append(Finding("features", None, "no FID features for this data (auto: digits-cnn for the built-in "
                             "domains, else inception when CHAINTUNE_INCEPTION is set)",
                             "pass --feature inception:/path/to/weights for FID"))
        return found
    try:
        net = feature_network(name)
        with torch.no_grad():
            fa, fb = net(x[:n].float()), net(bank.images[:n].float())
    except ChaintuneError as e:
        found.append(Finding("features", False, str(e), "pass --feature digits-cnn | inception:/path/to/weights"))
        return found
    ok = fa.shape[1:] == fb.shape[1:] and bool(torch.isfinite(fa).all() and torch.isfinite(fb).all())
    found.append(Finding("features", ok, f"{name}: {fa.shape[-1]}-dim features for data and bank images"
                         + ("" if ok else ", NOT finite or of different sizes"), "" if ok else "another --feature"))
    return found


def format_report(report: CheckReport) -> str:
    mark = {True: "ok", False: "FAIL", None: "n/a"}
    what = f"reward {report.reward}, estimator {report.estimator}" if report.reward else "transfer data"
    lines = [f"chaintune check: {report.model}, {what}", ""]
    width = max(len(f.name) for f in report.findings)
    for f in report.findings:
        lines.append(f"  {mark[f.ok]:4}  {f.name:{width}}  {f.detail}")
        if f.ok is False and f.fix:
            lines.append(f"  {'':4}  {'':{width}}  fix: {f.fix}")
    failed = sum(f.ok is False for f in report.findings)
    lines += ["", "all checks passed" if not failed else f"{failed} check(s) failed"]
    if report.recommendation:
        lines += ["", report.recommendation]
    return "\n".join(lines)
