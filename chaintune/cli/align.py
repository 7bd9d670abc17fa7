"""``chaintune align``, ``chaintune demo`` and ``chaintune plan``."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from chaintune.training.align import AlignConfig

_HELP = {
    "model": "Model id: builtin:NAME, a diffusers dir, a run dir or a hub id.",
    "reward": "Reward spec: digit:K, jpeg-compressibility, imagenet:CLASS, 0.7*a+0.3*b, module:function.",
    "estimator": "rlr | half-order | reinforce (ddpo) | zeroth-order | full-backprop | truncated-backprop | "
                 "alignprop | refl | rlr-released.",
    "h": "RLR / half-order span length (steps of backprop inside the likelihood-ratio span).",
    "j": "RLR span placement: uniform | grad-norm | a,b (paper steps, diffusive chain of thought).",
    "sigma": "Zeroth-order perturbation scale.",
    "zo": "RLR: zeroth-order on all remaining steps (the paper's unbiased eq. 6; high variance at large d).",
    "ho": "RLR: the half-order span (--no-ho = paper's 'without HO' ablation).",
    "shared_perturbation": "Zeroth-order: one perturbation direction for all ZO steps (lower variance).",
    "k": "Truncated backprop: number of final steps to backpropagate through.",
    "inner_epochs": "PPO inner epochs per batch (reinforce).",
    "clip_range": "PPO clip range (reinforce).",
    "sample_steps": "Denoising steps of the chain (T).",
    "eta": "DDIM eta of the chain (> 0: stochastic transitions with exact log-probs).",
    "scheduler": "ddim or ddpm.",
    "guidance_scale": "Classifier-free guidance scale (conditional models).",
    "prompt_file": "Prompt file: .txt (one a line, # comments), .json list, or builtin:NAME (text models).",
    "vae_chunk": "Decode latents through the VAE N samples at a time (less peak memory, latent models).",
    "eight_bit_adam": "bitsandbytes 8-bit AdamW (CUDA only; falls back to AdamW with a warning).",
    "coarse_prompt": "Diffusive chain of thought: prompt for the first (coarse) third of the chain.",
    "mid_prompt": "Prompt for the middle third of the chain.",
    "fine_prompt": "Prompt for the last (fine) third of the chain.",
    "stage_boundaries": "Chain-position fractions b1,b2 splitting coarse/mid/fine.",
    "steps": "Optimizer steps.",
    "batch_size": "Samples per micro-batch.",
    "grad_accum": "Micro-batches per optimizer step.",
    "lr": "AdamW learning rate.",
    "weight_decay": "AdamW weight decay.",
    "max_grad_norm": "Gradient clipping norm.",
    "warmup_steps": "Linear LR warm-up steps.",
    "lr_schedule": "LR after warm-up: constant | cosine | linear (both decay to 0 at the last step).",
    "peft": "none (full weights) or lora.",
    "lora_rank": "LoRA rank.",
    "mixed_precision": "no | fp16 | bf16 (adapters stay fp32).",
    "gradient_checkpointing": "Recompute model calls in backward to save memory.",
    "baseline": "Reward baseline for likelihood-ratio terms: batch | prompt | none (leave-one-out, unbiased).",
    "spans": "RLR: independent half-order spans averaged per sample (unbiased; lowers variance).",
    "kl_weight": "Weight of the closed-form KL to the base model's transitions (reward-hacking guard).",
    "kl_samples": "Samples per KL estimate.",
    "retention_weight": "Weight of a denoising loss on base-model samples (reward-hacking guard).",
    "retention_samples": "Base-model samples generated for the retention loss.",
    "heldout_reward": "Reward evaluated but never trained on (auto: digit:K -> digit-heldout:K; '' to disable).",
    "eval_every": "Evaluate (held-out seeds, grid) every N steps.",
    "eval_samples": "Samples per evaluation.",
    "save_every": "Checkpoint every N steps.",
    "keep_checkpoints": "Checkpoints kept.",
    "max_bad_steps": "Stop after this many non-finite updates in a row.",
    "seed": "Random seed.",
    "device": "cpu, cuda, ... (default: best available).",
    "tensorboard": "Write tensorboard logs under OUT/tb.",
}


def _options_from_cli(ctx: typer.Context, cli_values: dict, config: Path | None) -> AlignConfig:
    """Config file first, then explicitly given CLI flags on top."""
    from chaintune.utils.io import load_config_file

    values = load_config_file(config) if config else {}
    AlignConfig.from_dict(values)  # reject typos in the file early, with a suggestion
    for k, v in cli_values.items():
        src = ctx.get_parameter_source(k)
        if src is not None and src.name == "COMMANDLINE":
            values[k] = v
        elif k not in values and v is not None:
            values[k] = v
    if values.get("heldout_reward") == "":
        values["heldout_reward"] = None
    return AlignConfig.from_dict(values)


def register(app: typer.Typer) -> None:
    d = AlignConfig()

    @app.command()
    def align(
        ctx: typer.Context,
        out: Annotated[Path, typer.Option(help="Run directory (becomes a model id).")] = Path(d.out),
        config: Annotated[Path | None, typer.Option(help="YAML/TOML file with any of these options.")] = None,
        model: Annotated[str, typer.Option(help=_HELP["model"])] = d.model,
        reward: Annotated[str, typer.Option(help=_HELP["reward"])] = d.reward,
        estimator: Annotated[str, typer.Option(help=_HELP["estimator"])] = d.estimator,
        h: Annotated[int, typer.Option(help=_HELP["h"])] = d.h,
        j: Annotated[str, typer.Option(help=_HELP["j"])] = d.j,
        sigma: Annotated[float, typer.Option(help=_HELP["sigma"])] = d.sigma,
        zo: Annotated[bool, typer.Option(help=_HELP["zo"])] = d.zo,
        ho: Annotated[bool, typer.Option(help=_HELP["ho"])] = d.ho,
        spans: Annotated[int, typer.Option(help=_HELP["spans"])] = d.spans,
        shared_perturbation: Annotated[bool, typer.Option(help=_HELP["shared_perturbation"])]
        = d.shared_perturbation,
        k: Annotated[int, typer.Option(help=_HELP["k"])] = d.k,
        inner_epochs: Annotated[int, typer.Option(help=_HELP["inner_epochs"])] = d.inner_epochs,
        clip_range: Annotated[float, typer.Option(help=_HELP["clip_range"])] = d.clip_range,
        sample_steps: Annotated[int, typer.Option(help=_HELP["sample_steps"])] = d.sample_steps,
        eta: Annotated[float, typer.Option(help=_HELP["eta"])] = d.eta,
        scheduler: Annotated[str, typer.Option(help=_HELP["scheduler"])] = d.scheduler,
        guidance_scale: Annotated[float | None, typer.Option(help=_HELP["guidance_scale"])] = None,
        prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable).")] = None,
        prompt_file: Annotated[str | None, typer.Option(help=_HELP["prompt_file"])] = None,
        label: Annotated[list[int] | None, typer.Option(help="A class label to train on (repeatable).")] = None,
        steps: Annotated[int, typer.Option(help=_HELP["steps"])] = d.steps,
        batch_size: Annotated[int, typer.Option(help=_HELP["batch_size"])] = d.batch_size,
        grad_accum: Annotated[int, typer.Option(help=_HELP["grad_accum"])] = d.grad_accum,
        lr: Annotated[float, typer.Option(help=_HELP["lr"])] = d.lr,
        weight_decay: Annotated[float, typer.Option(help=_HELP["weight_decay"])] = d.weight_decay,
        max_grad_norm: Annotated[float, typer.Option(help=_HELP["max_grad_norm"])] = d.max_grad_norm,
        warmup_steps: Annotated[int, typer.Option(help=_HELP["warmup_steps"])] = d.warmup_steps,
        lr_schedule: Annotated[str, typer.Option(help=_HELP["lr_schedule"])] = d.lr_schedule,
        peft: Annotated[str, typer.Option(help=_HELP["peft"])] = d.peft,
        lora_rank: Annotated[int, typer.Option(help=_HELP["lora_rank"])] = d.lora_rank,
        mixed_precision: Annotated[str, typer.Option(help=_HELP["mixed_precision"])] = d.mixed_precision,
        vae_chunk: Annotated[int | None, typer.Option(help=_HELP["vae_chunk"])] = None,
        eight_bit_adam: Annotated[bool, typer.Option(help=_HELP["eight_bit_adam"])] = d.eight_bit_adam,
        coarse_prompt: Annotated[str | None, typer.Option(help=_HELP["coarse_prompt"])] = None,
        mid_prompt: Annotated[str | None, typer.Option(help=_HELP["mid_prompt"])] = None,
        fine_prompt: Annotated[str | None, typer.Option(help=_HELP["fine_prompt"])] = None,
        stage_boundaries: Annotated[str, typer.Option(help=_HELP["stage_boundaries"])] = d.stage_boundaries,
        gradient_checkpointing: Annotated[bool, typer.Option(help=_HELP["gradient_checkpointing"])]
        = d.gradient_checkpointing,
        baseline: Annotated[str, typer.Option(help=_HELP["baseline"])] = d.baseline,
        kl_weight: Annotated[float, typer.Option(help=_HELP["kl_weight"])] = d.kl_weight,
        kl_samples: Annotated[int, typer.Option(help=_HELP["kl_samples"])] = d.kl_samples,
        retention_weight: Annotated[float, typer.Option(help=_HELP["retention_weight"])] = d.retention_weight,
        retention_samples: Annotated[int, typer.Option(help=_HELP["retention_samples"])] = d.retention_samples,
        heldout_reward: Annotated[str | None, typer.Option(help=_HELP["heldout_reward"])] = d.heldout_reward,
        eval_every: Annotated[int, typer.Option(help=_HELP["eval_every"])] = d.eval_every,
        eval_samples: Annotated[int, typer.Option(help=_HELP["eval_samples"])] = d.eval_samples,
        save_every: Annotated[int, typer.Option(help=_HELP["save_every"])] = d.save_every,
        keep_checkpoints: Annotated[int, typer.Option(help=_HELP["keep_checkpoints"])] = d.keep_checkpoints,
        max_bad_steps: Annotated[int, typer.Option(help=_HELP["max_bad_steps"])] = d.max_bad_steps,
        seed: Annotated[int, typer.Option(help=_HELP["seed"])] = d.seed,
        device: Annotated[str | None, typer.Option(help=_HELP["device"])] = None,
        tensorboard: Annotated[bool, typer.Option(help=_HELP["tensorboard"])] = d.tensorboard,
        resume: Annotated[bool, typer.Option(help="Continue the run in OUT from its latest checkpoint.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Delete an existing run in OUT first.")] = False,
    ):
        """Align a model to a reward (RLR or a baseline estimator); writes a run directory."""
        from chaintune.training.align import align as run

        loc = dict(locals())
        names = {f.name for f in fields(AlignConfig)}
        cli = {kk: v for kk, v in loc.items() if kk in names}
        cli["out"] = str(out)
        cli["prompts"] = list(prompt) if prompt else None
        cli["labels"] = list(label) if label else None
        for alias, name in (("prompt", "prompts"), ("label", "labels")):
            src = ctx.get_parameter_source(alias)
            if src is not None and src.name == "COMMANDLINE":
                cli[name] = cli[name]
        if resume and config is None and (out / "config.yaml").exists():
            config = out / "config.yaml"  # continue with the run's own settings; flags given now override
        cfg = _options_from_cli(ctx, cli, config)
        cfg.out = str(out)
        path = run(cfg, overwrite=overwrite, resume=resume)
        typer.echo(f"run saved to {path} (load it with: chaintune sample --model {path})")

    @app.command()
    def demo(
        out: Annotated[Path, typer.Option(help="Directory for the demo's runs and grids.")] = Path("runs/demo"),
        steps: Annotated[int, typer.Option(help="RLR optimizer steps (the comparison runs get a third).")] = 150,
        digit: Annotated[int, typer.Option(help="Digit the reward asks for.")] = 3,
        baseline: Annotated[str, typer.Option(help="Baseline estimator run briefly beside RLR ('' to skip).")]
        = "reinforce",
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    ):
        """Align builtin:digits to 'digit:K' with RLR and a baseline; print a before/after table."""
        from chaintune.training.demo import run_demo

        run_demo(out, steps=steps, digit=digit, baseline=baseline or None, seed=seed)

    @app.command()
    def plan(
        model: Annotated[str, typer.Option(help=_HELP["model"])] = "builtin:digits",
        memory_budget: Annotated[str, typer.Option(help="Memory budget, e.g. 24GB, 512MB.")] = "24GB",
        sample_steps: Annotated[int, typer.Option(help=_HELP["sample_steps"])] = 50,
        batch_size: Annotated[int, typer.Option(help="Samples per micro-batch to plan for.")] = 1,
        peft: Annotated[str, typer.Option(help=_HELP["peft"])] = "lora",
        device: Annotated[str | None, typer.Option(help=_HELP["device"])] = None,
    ):
        """Measure one half-order and one zeroth-order step and print h* for a memory budget (paper's formula)."""
        from chaintune.training.planner import format_plan, plan_memory

        typer.echo(format_plan(plan_memory(model, memory_budget, sample_steps=sample_steps, batch_size=batch_size,
                                           peft=peft, device=device)))
