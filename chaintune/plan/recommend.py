"""Which estimator for my model, my reward and my memory: the measured answer, applied to the user's own setting.

:func:`recommend` measures what it needs on the user's model (the planner's probe of one tracked step with and
without gradient checkpointing, and of a zeroth-order step; optionally where along the chain the reward is
decided, :func:`chaintune.diagnostics.decision_profile`), estimates the peak memory and the work per sample of the
best configuration of every estimator family within the budget, and then follows the ranking measured for that
situation — reward differentiable or black box x memory loose (full backprop fits without checkpointing) or
tight — to the first family that fits. The rankings and their numbers are :data:`RANKINGS`, from
``benchmarks/which_estimator.py`` and ``benchmarks/budgets.py`` (docs/results.md, "Which estimator when").

Memory model (validated against measured peaks in docs/results.md): B_h is one tracked step's saved activations
(``measure_step``), B_c the same under gradient checkpointing, B_z a stored step (latents, mean, noise), all at
the planned batch and linear in it. Full backprop holds T x B_h (T x B_c + B_h checkpointed, per micro-batch);
truncated backprop K x B_h + T x B_z; RLR (h + 1) x B_h + T x B_z (the first-order step and one span, the
rollout's latents kept to replay spans); DDPO and GRPO B_h + T x B_z. Work per sample counts denoiser
evaluations (a forward 1, a backward 2).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import chaintune
from chaintune.adapters import apply_peft
from chaintune.align.config import AlignConfig
from chaintune.diagnostics import decision_profile
from chaintune.errors import ChaintuneError
from chaintune.options import flat_values
from chaintune.plan.memory import fixed_cost, measure_step, parse_bytes
from chaintune.rewards import get_reward
from chaintune.utils.devices import format_bytes


@dataclass(frozen=True)
class Ranking:
    """A measured ranking of estimator families for one situation, best first, and where it was measured."""

    families: tuple[str, ...]
    evidence: str


# (reward kind, memory) -> the measured ranking. Updated from docs/results.md, "Which estimator when"; every entry
# names the runs behind it (3 seeds each, the LR chosen on a fourth seed, a held-out judge).
RANKINGS: dict[tuple[str, str], Ranking] = {
    ("differentiable", "loose"): Ranking(
        ("full-backprop", "rlr", "nft", "ddpo", "truncated-backprop"),
        "digit:5, 4,800 samples, 3 seeds, LR per method on a fourth (benchmarks/results/which_image.json, "
        "which_image_nft_dpo.json): full backprop 100% 5s, DiffusionNFT 97.9%, RLR h=2 96.4% (a tie with NFT), DPO "
        "50.0%, DDPO and GRPO 31.2%, AlignProp 8.9% (base 7.3%); video prompt fidelity, 1,600 clips, 3 seeds "
        "(which_video.json, which_video_nft_dpo.json): full backprop 90.6%, RLR 74.0-76.0%, GRPO 75.0%, DDPO "
        "74.0%, NFT and DPO 72.9% (base 71.9%); first at equal wall-clock too; on a late-decided video reward "
        "(smoothness, which_video-smooth.json) full backprop gained 0.028 held-out reward, truncated k=5 0.025, "
        "AlignProp 0.006, RLR "
        "0.005 (0.001 with its spans where the reward is decided), DDPO 0. Truncated backprop k=10 also "
        "delivered 100% on images (which_image_budgets.json) but k=5 18.8%, RLR h=5 76.0% (which_image_h5k5.json)"),
    ("differentiable", "tight"): Ranking(
        ("full-backprop", "rlr", "nft", "ddpo", "truncated-backprop"),
        "at RLR h=2's memory checkpointed full backprop in micro-batches of 16 still fits and delivered 100% at "
        "equal samples and equal time against RLR h=2's 96.4% (benchmarks/results/budgets_image.json); RLR is next "
        "where even that does not fit. Truncated backprop at the largest K that fits is mixed, so it stays behind: "
        "k=5 delivered 18.8% on images (the guard rolled back every seed at its chosen LR; which_image_h5k5.json) "
        "and 89.6% on video, level with checkpointed full backprop's 90.6% (which_video_k5.json)"),
    ("black-box", "loose"): Ranking(
        ("nft", "ddpo", "grpo", "rlr", "zeroth-order"),
        "digit-blackbox:5, 4,800 samples, 3 seeds (benchmarks/results/which_image-blackbox.json): DDPO and GRPO "
        "27.6% 5s, RLR 7.3%, zeroth-order 7.3% (base 7.3%); DiffusionNFT never uses the reward's gradient, and on "
        "digit:5 (the same classifier before the 8-bit rounding) it delivered 97.9% over 3 seeds "
        "(which_image_nft_dpo.json): first, though not run on the black-box target itself"),
    ("black-box", "tight"): Ranking(
        ("nft", "ddpo", "grpo", "rlr", "zeroth-order"),
        "black-box rewards get no pathwise terms, so memory does not change the ranking"),
}


@dataclass
class Option:
    """One estimator family's best configuration within the budget (``fits`` False: its smallest one did not)."""

    family: str
    label: str
    flags: dict
    peak: int
    work: float  # denoiser evaluations per sample (forward 1, backward 2)
    fits: bool


@dataclass
class Recommendation:
    situation: tuple[str, str]
    choice: Option | None
    why: str
    options: list[Option] = field(default_factory=list)
    budget: int = 0
    fixed: int = 0
    steps: int = 0
    batch_size: int = 0
    decided: dict | None = None  # DecisionProfile.as_dict() of the reward on this model

    def flags(self) -> list[str]:
        """``chaintune align`` flags of the choice (what differs from align's defaults, plus the estimator)."""

        if self.choice is None:
            return []
        defaults = flat_values(AlignConfig())
        out: list[str] = []
        for name, value in self.choice.flags.items():
            if value is None or (name != "estimator" and defaults.get(name) == value):
                continue
            flag = "--" + name.replace("_", "-")
            out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
        return out


def _options(b_h: int, b_c: int, b_z: int, steps: int, batch: int, left: int, differentiable: bool,
             decided=None) -> list[Option]:
    """The best configuration of each family within ``left`` bytes (memory model in the module docstring)."""
    T, opts = steps, []
    if differentiable:
        full = T * b_h
        if full <= left:
            opts.append(Option("full-backprop", "full backprop", {"estimator": "full-backprop",
                               "gradient_checkpointing": False}, full, 3 * T, True))
        else:
            per_sample = (T * b_c + b_h) / batch
            micro = max((m for m in range(1, batch + 1) if batch % m == 0 and m * per_sample <= left), default=0)
            m = micro or 1
            opts.append(Option("full-backprop", f"full backprop, checkpointed, micro-batch {m} x {batch // m}",
                               {"estimator": "full-backprop", "gradient_checkpointing": True, "batch_size": m,
                                "grad_accum": batch // m}, int(m * per_sample), 4 * T, micro > 0))
        ks = [k for k in range(1, T + 1) if k * b_h + T * b_z <= left]
        k = max(ks, default=1)
        opts.append(Option("truncated-backprop", f"truncated backprop k={k}", {"estimator": "truncated-backprop",
                           "k": k}, k * b_h + T * b_z, T + 3 * k, bool(ks)))
    hs = [h for h in range(1, T) if (h + int(differentiable)) * b_h + T * b_z <= left]
    h = max(hs, default=1)
    flags = {"estimator": "rlr", "h": h}
    if decided is not None and T >= 3:
        a, b = decided.span_range(h)
        flags["j"] = f"{a},{b}"
    opts.append(Option("rlr", f"rlr h={h}" + (f" j={flags['j']}" if "j" in flags else ""), flags,
                       (h + int(differentiable)) * b_h + T * b_z, T + 2 + 4 * 3 * h, bool(hs)))
    lr_peak = b_h + T * b_z
    opts.append(Option("ddpo", "ddpo", {"estimator": "reinforce"}, lr_peak, 4 * T - 3, lr_peak <= left))
    # DiffusionNFT: a no-grad rollout, then one tracked denoiser call per trained timestep (DDPO's peak, measured
    # equal: 38 MiB both, docs/results.md); T forwards plus T forward/backward pairs
    opts.append(Option("nft", "nft", {"estimator": "nft"}, lr_peak, 4 * T, lr_peak <= left))
    opts.append(Option("grpo", "grpo", {"estimator": "grpo"}, lr_peak, 4 * T - 3, lr_peak <= left))
    if not differentiable:
        opts.append(Option("zeroth-order", "zeroth-order", {"estimator": "zeroth-order"}, T * b_z, T, T * b_z <= left))
    return opts


def choose(options: list[Option], differentiable: bool, loose: bool) -> tuple[tuple[str, str], Option | None, str]:
    """The situation, the first family of its measured ranking whose configuration fits, and why."""
    situation = ("differentiable" if differentiable else "black-box", "loose" if loose else "tight")
    ranking = RANKINGS[situation]
    by = {o.family: o for o in options}
    for fam in ranking.families:
        o = by.get(fam)
        if o is not None and o.fits:
            return situation, o, f"{situation[0]} reward, {situation[1]} memory: {ranking.evidence}"
    return situation, None, "nothing fits the budget: lower --batch-size or --sample-steps, or use --peft lora"


def recommend(model_id: str, reward: str, budget: str | int, sample_steps: int = 50, batch_size: int = 8,
              peft: str = "lora", device: str | None = None, decided: bool = True,
              decided_samples: int = 16) -> Recommendation:
    """Recommend an estimator and its settings for ``reward`` on ``model_id`` within ``budget`` (module docstring)."""
    import torch

    for flag, value, least in (("--batch-size", batch_size, 1), ("--sample-steps", sample_steps, 2)):
        if value < least:
            raise ChaintuneError(f"{flag} must be >= {least}, got {value}")
    budget_b = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    rew = get_reward(reward)  # an unknown reward fails before the model loads
    differentiable = bool(getattr(rew, "differentiable", False))
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = chaintune.load(model_id, device=dev)
    apply_peft(model.denoiser, peft)
    fixed = fixed_cost(model, budget_b)
    left = budget_b - fixed
    b_h, b_z = measure_step(model, batch_size, checkpoint=False)
    b_c, _ = measure_step(model, batch_size, checkpoint=True)
    profile = None
    if decided:
        with torch.no_grad():
            profile = decision_profile(model, rew, n=decided_samples, steps=sample_steps,
                                       generator=torch.Generator().manual_seed(0))
    options = _options(b_h, b_c, b_z, sample_steps, batch_size, left, differentiable, profile)
    loose = any(o.family == "full-backprop" and o.fits and not o.flags["gradient_checkpointing"] for o in options)
    situation, choice, why = choose(options, differentiable, loose)
    if choice is not None:
        choice.flags.update({"model": model_id, "reward": reward, "sample_steps": sample_steps, "peft": peft,
                             **({"batch_size": batch_size} if "batch_size" not in choice.flags else {})})
    return Recommendation(situation, choice, why, options, budget_b, fixed, sample_steps, batch_size,
                          profile.as_dict() if profile is not None else None)



def format_recommendation(r: Recommendation) -> str:
    lines = [f"situation            {r.situation[0]} reward, {r.situation[1]} memory "
             f"(budget {format_bytes(r.budget)}, fixed {format_bytes(r.fixed)}, T = {r.steps}, batch {r.batch_size})"]
    if r.decided is not None:
        d = r.decided
        lines.append(f"reward decided       {d['where']} (share in the data half of the chain {d['late_share']:.2f}; "
                     f"RLR span range j = {d['span_range'][0]},{d['span_range'][1]})")
    lines.append("options within the budget (estimated peak above the fixed cost, denoiser evaluations per sample):")
    for o in r.options:
        lines.append(f"  {'fits ' if o.fits else 'no   '} {o.label:<48s} {format_bytes(o.peak):>10s} {o.work:>7.0f}")
    if r.choice is None:
        lines.append(f"recommendation       none: {r.why}")
    else:
        lines.append(f"recommendation       {r.choice.label}")
        lines.append(f"why                  {r.why}")
        lines.append(f"run                  chaintune align {shlex.join(r.flags())}")
    return "\n".join(lines)
