"""``chaintune transfer`` (Diff-Tuning / plain fine-tuning) and ``chaintune forgetting``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def transfer(
        out: Annotated[Path, typer.Option(help="Run directory to write (it becomes a model id).")],
        model: Annotated[str | None, typer.Option(help="Base model id (builtin:glyphs, a diffusers dir, a run).")]
        = None,
        data: Annotated[str | None, typer.Option(
            help="Target data: digits-fewshot:K, digits:train, glyphs:train, or a folder of images.")] = None,
        method: Annotated[str | None, typer.Option(help="diff-tuning or plain.")] = None,
        peft: Annotated[str | None, typer.Option(help="none, lora, bitfit or difffit.")] = None,
        steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
        config: Annotated[Path | None, typer.Option(help="YAML/TOML config with any TransferConfig field.")]
        = None,
        batch_size: Annotated[int | None, typer.Option(help="Images per step (target + bank).")] = None,
        lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
        lam: Annotated[float | None, typer.Option(
            "--lambda", help="Weight of the retention loss (0: no bank, only the psi timestep law).")] = None,
        bank_size: Annotated[int | None, typer.Option(help="Knowledge-bank samples (cached and reused).")]
        = None,
        timestep_mode: Annotated[str | None, typer.Option(
            help="sampling (importance-sample t) or weighting (uniform t, weighted losses).")] = None,
        eval_data: Annotated[str | None, typer.Option(help="Held-out images for FID ('auto': the test split).")]
        = None,
        feature: Annotated[str | None, typer.Option(
            help="FID features: digits-cnn, digits-mlp or inception:/path/to/weights ('auto').")] = None,
        eval_every: Annotated[int | None, typer.Option(help="Evaluate (FID, sample grid) every N steps.")]
        = None,
        seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: best available).")] = None,
        checkpoint_every: Annotated[int | None, typer.Option(
            help="Write a resumable checkpoint every N steps (0: none).")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
        resume: Annotated[bool, typer.Option(help="Continue the run in OUT from its latest checkpoint.")] = False,
    ):
        """Fine-tune a pretrained model on new data with Diff-Tuning or plain fine-tuning."""
        from chaintune.transfer import TransferConfig
        from chaintune.transfer import transfer as run
        from chaintune.utils.io import load_config_file

        if resume and config is None and (out / "config.yaml").exists():
            config = out / "config.yaml"  # continue with the run's own settings; flags given now override
        values = load_config_file(config) if config else {}
        cli = {"model": model, "data": data, "method": method, "peft": peft, "steps": steps,
               "batch_size": batch_size, "lr": lr, "lam": lam, "bank_size": bank_size,
               "timestep_mode": timestep_mode, "eval_data": eval_data, "feature": feature,
               "eval_every": eval_every, "seed": seed, "device": device, "checkpoint_every": checkpoint_every}
        values.update({k: v for k, v in cli.items() if v is not None})
        cfg = TransferConfig.from_dict(values)
        res = run(cfg, out=out, overwrite=overwrite, resume=resume)
        fid = res.final.get("fid")
        tail = f", FID {fid:.3f} (KID {res.final['kid']:.4f})" if fid is not None else ""
        typer.echo(f"saved run to {out} ({cfg.method}/{cfg.peft}, {cfg.steps} steps{tail}); "
                   f"sample with: chaintune sample --model {out}")

    @app.command()
    def forgetting(
        base: Annotated[str, typer.Option(help="The pretrained model M0.")],
        tuned: Annotated[str, typer.Option(help="The fine-tuned model M1 (e.g. a transfer run directory).")],
        data: Annotated[str, typer.Option(help="Target data for the per-timestep losses (e.g. digits:test).")],
        out: Annotated[Path, typer.Option(help="Output directory (forgetting.json, forgetting.png).")]
        = Path("out/forgetting"),
        eval_data: Annotated[str | None, typer.Option(
            help="Held-out target images for the hand-over FID (default: --data).")] = None,
        feature: Annotated[str, typer.Option(help="FID features: digits-cnn or inception:/path.")] = "digits-cnn",
        bank_size: Annotated[int | None, typer.Option(
            help="Knowledge-bank samples of the base model (cached; default: the tuned run's, else 1000).")]
        = None,
        bank_labels: Annotated[str | None, typer.Option(
            help="Bank classes: random, null or ids like 0,1,2 (default: the tuned run's, else random).")] = None,
        timesteps: Annotated[int, typer.Option(help="Number of timesteps on the loss grid.")] = 20,
        samples: Annotated[int, typer.Option(help="Images per hand-over threshold for FID (0: skip).")] = 500,
        steps: Annotated[int, typer.Option(help="Sampling steps of the hand-over chain.")] = 50,
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    ):
        """Per-timestep forgetting of a fine-tuned model and hand-over FID (JSON + plot)."""
        from dataclasses import replace

        import chaintune
        from chaintune.transfer import TransferConfig
        from chaintune.transfer.bank import build_bank
        from chaintune.transfer.data import load_target
        from chaintune.transfer.forgetting import analyze, write_report

        m0, m1 = chaintune.load(base), chaintune.load(tuned)
        x, y = load_target(m0, data)
        ev = load_target(m0, eval_data)[0] if eval_data else x
        # the tuned run's own bank settings (and cache) when --tuned is a transfer run directory
        cfg = (TransferConfig.from_run(tuned) if Path(tuned).is_dir() else None) or TransferConfig(bank_seed=seed)
        overrides = {"bank_size": bank_size, "bank_labels": bank_labels}
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        bank = build_bank(m0, cfg.bank_config(), cfg.bank_dir)
        res = analyze(m0, m1, x, bank.latents, eval_images=ev if samples > 0 else None, num_timesteps=timesteps,
                      handover_n=max(samples, 2), steps=steps, feature=feature, seed=seed,
                      target_labels=y if len(y) == len(x) else None)
        res["models"] = {"base": base, "tuned": tuned}
        res.update(data=data, eval_data=eval_data or data, bank_path=str(bank.path))
        jpath, ppath = write_report(res, out, title=f"{tuned} vs {base} on {data}")
        hand = f", hand-over FID Spearman {res['handover_spearman']:.2f}" if "handover" in res else ""
        typer.echo(f"bank-loss forgetting Spearman(t) {res['forgetting_spearman']:.2f}{hand}; wrote {jpath}, {ppath}")
