"""``chaintune align`` (generated from AlignConfig), ``chaintune demo`` and ``chaintune plan``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chaintune.align.config import AlignConfig, ChainConfig
from chaintune.cli.options import config_command
from chaintune.options import INT64, field_help
from chaintune.run.config import OptimConfig, RunConfig
from chaintune.transfer.config import TransferConfig, TransferEvalConfig


def _align(cfg: AlignConfig, *, resume: bool, overwrite: bool) -> None:
    from chaintune.align.objective import align_run
    from chaintune.run.trainer import format_summary

    typer.echo(format_summary(align_run(cfg, overwrite=overwrite, resume=resume)))


def register(app: typer.Typer) -> None:
    config_command(app, "align", AlignConfig, _align, code_options=("reward", "heldout_reward"),
                   help="Align a model to a reward (RLR or a baseline estimator); writes a run directory.")

    @app.command()
    def demo(
        out: Annotated[Path | None, typer.Option(help="Directory for the demo's runs and grids [default: runs/demo, "
                                                 "runs/demo-video with --video].")] = None,
        steps: Annotated[int | None, typer.Option(help="RLR optimizer steps (the comparison runs get a third) "
                                                  "[default: 150; 30 for each method with --video].")] = None,
        digit: Annotated[int, typer.Option(help="Digit the reward asks for.")] = 3,
        baseline: Annotated[str, typer.Option(help="Baseline estimator run briefly beside RLR ('' to skip).")]
        = "reinforce",
        seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=INT64[1])] = 0,
        video: Annotated[bool, typer.Option("--video", help="The text-to-video demo instead: builtin:moving-digits "
                                            "aligned to prompt fidelity with RLR and full backprop (--steps default "
                                            "30 then); before/after clips as GIFs.")] = False,
    ):
        """Align builtin:digits to 'digit:K' with RLR and a baseline; print a before/after table."""
        if video:
            from chaintune.align.demo import run_video_demo

            run_video_demo(out or Path("runs/demo-video"), steps=30 if steps is None else steps, seed=seed)
            return
        from chaintune.align.demo import run_demo

        run_demo(out or Path("runs/demo"), steps=150 if steps is None else steps, digit=digit,
                 baseline=baseline or None, seed=seed)

    @app.command()
    def check(
        reward: Annotated[str | None, typer.Option(help="The reward to check (a name, SPEC or module:function).")]
        = None,
        model: Annotated[str, typer.Option(help=field_help(ChainConfig, "model"))] = "builtin:digits",
        estimator: Annotated[str, typer.Option(help="The estimator whose gradient is checked.")] = "rlr",
        memory_budget: Annotated[str | None, typer.Option("--memory-budget", "--memory", help="Also report which "
                                                          "estimator configurations fit this budget.")] = None,
        sample_steps: Annotated[int, typer.Option(help=field_help(ChainConfig, "sample_steps"))] = 10,
        batch_size: Annotated[int, typer.Option(help="Samples per check.")] = 2,
        prompt: Annotated[list[str] | None, typer.Option(help="Prompt(s) to check with (default: the model's).")]
        = None,
        guidance_scale: Annotated[float | None, typer.Option(help=field_help(ChainConfig, "guidance_scale"))] = None,
        peft: Annotated[str, typer.Option(help=field_help(OptimConfig, "peft"))] = "lora",
        device: Annotated[str | None, typer.Option(help=field_help(RunConfig, "device"))] = None,
        data: Annotated[str | None, typer.Option(help="Check transfer data too: " + field_help(TransferConfig, "data"))]
        = None,
        feature: Annotated[str, typer.Option(help=field_help(TransferEvalConfig, "feature"))] = "auto",
        controlnet: Annotated[str | None, typer.Option(help="Check reward fine-tuning of this ControlNet run: "
                                                       + field_help(ChainConfig, "controlnet"))] = None,
        control_data: Annotated[str, typer.Option(help=field_help(ChainConfig, "control_data"))] = "auto",
    ):
        """Check the model, the reward and one gradient estimate on your own setting in minutes, before a long run:
        sampler == the model's diffusers pipeline, PPO ratio 1 before an update, reward shape and gradient, the
        gradient reaching every trainable parameter, what fits the memory; with --data, transfer's data, knowledge
        bank and FID features. Exit 3 when a check fails."""
        from chaintune.plan.check import check as run_check
        from chaintune.plan.check import format_report

        report = run_check(model, reward, estimator=estimator, memory=memory_budget, steps=sample_steps,
                           n=batch_size, prompts=prompt, guidance_scale=guidance_scale, peft=peft, device=device,
                           data=data, feature=feature, controlnet=controlnet, control_data=control_data)
        typer.echo(format_report(report))
        if not report.ok:
            raise typer.Exit(3)

    @app.command()
    def plan(
        model: Annotated[str, typer.Option(help=field_help(ChainConfig, "model"))] = "builtin:digits",
        memory_budget: Annotated[str, typer.Option("--memory-budget", "--memory",
                                                   help="Memory budget, e.g. 24GB, 512MB.")] = "24GB",
        sample_steps: Annotated[int, typer.Option(help=field_help(ChainConfig, "sample_steps"))] = 50,
        batch_size: Annotated[int, typer.Option(help="Samples per micro-batch to plan for.")] = 1,
        peft: Annotated[str, typer.Option(help=field_help(OptimConfig, "peft"))] = "lora",
        device: Annotated[str | None, typer.Option(help=field_help(RunConfig, "device"))] = None,
        reward: Annotated[str | None, typer.Option(
            help="Also recommend an estimator and its settings for this reward within the budget, from the measured "
            "rankings (docs/results.md, 'Which estimator when'); measures where along the chain it is decided.")]
        = None,
    ):
        """Measure one half-order and one zeroth-order step and print h* for a memory budget (paper's formula);
        with --reward, the estimator and settings to use."""
        if reward is not None:
            from chaintune.plan.recommend import format_recommendation, recommend

            typer.echo(format_recommendation(recommend(model, reward, memory_budget, sample_steps=sample_steps,
                                                       batch_size=batch_size, peft=peft, device=device)))
            return
        from chaintune.plan.memory import format_plan, plan_memory

        typer.echo(format_plan(plan_memory(model, memory_budget, sample_steps=sample_steps, batch_size=batch_size,
                                           peft=peft, device=device)))
