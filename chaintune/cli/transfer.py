"""``chaintune transfer`` (generated from TransferConfig) and ``chaintune forgetting``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chaintune.cli.options import config_command
from chaintune.options import INT64
from chaintune.transfer.config import TransferConfig


def _transfer(cfg: TransferConfig, *, resume: bool, overwrite: bool) -> None:
    from chaintune.run.trainer import format_summary
    from chaintune.transfer.trainer import transfer

    typer.echo(format_summary(transfer(cfg, cfg.run.out, overwrite=overwrite, resume=resume)))


def register(app: typer.Typer) -> None:
    config_command(app, "transfer", TransferConfig, _transfer,
                   help="Fine-tune a pretrained model on new data with Diff-Tuning or plain fine-tuning.")

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
            help="Knowledge-bank samples of the base model (cached; default: the tuned run's, else 1000).", min=1)]
        = None,
        bank_labels: Annotated[str | None, typer.Option(
            help="Bank classes: random, null or ids like 0,1,2 (default: the tuned run's, else random).")] = None,
        timesteps: Annotated[int, typer.Option(help="Number of timesteps on the loss grid.", min=2)] = 20,
        samples: Annotated[int, typer.Option(help="Images per hand-over threshold for FID (0: skip).", min=0)] = 500,
        steps: Annotated[int, typer.Option(help="Sampling steps of the hand-over chain.", min=2)] = 50,
        seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=INT64[1])] = 0,
        allow_pickle: Annotated[bool, typer.Option(
            help="Allow pickled (.bin/.pt) model weights and a TorchScript inception:/path; only for files you "
            "trust (loading them runs code).")] = False,
        overwrite: Annotated[bool, typer.Option(
            help="Replace forgetting.json and forgetting.png in --out (other files there are kept).")] = False,
    ):
        """Per-timestep forgetting of a fine-tuned model and hand-over FID (JSON + plot)."""
        import chaintune
        from chaintune.metrics import feature_network
        from chaintune.transfer import TransferConfig
        from chaintune.transfer.bank import build_bank
        from chaintune.transfer.data import load_target
        from chaintune.transfer.forgetting import analyze, write_report
        from chaintune.utils.io import check_output_dir, check_overwrite

        # cheap errors first: an existing report, a bad feature spec or bank option fails before a model loads
        check_overwrite([check_output_dir(out) / "forgetting.json", out / "forgetting.png"], overwrite)
        # resolved once here, with the opt-in, and handed on as a module (not re-loaded per hand-over threshold)
        features = feature_network(feature, allow_pickle=allow_pickle) if samples > 0 else None
        # the tuned run's own bank settings (and cache) when --tuned is a transfer run directory
        cfg = (TransferConfig.from_run(tuned) if Path(tuned).is_dir() else None) \
            or TransferConfig.from_dict({"bank_seed": seed})
        if bank_size is not None:
            cfg.bank.size = bank_size
        if bank_labels is not None:
            cfg.bank.labels = bank_labels
        cfg.validate()
        m0, m1 = chaintune.load(base, allow_pickle=allow_pickle), chaintune.load(tuned, allow_pickle=allow_pickle)
        x, y = load_target(m0, data)
        ev = load_target(m0, eval_data)[0] if eval_data else x
        bank = build_bank(m0, cfg.bank, cfg.bank.dir)
        res = analyze(m0, m1, x, bank.latents, eval_images=ev if samples > 0 else None, num_timesteps=timesteps,
                      handover_n=max(samples, 2), steps=steps, feature=features, seed=seed,
                      target_labels=y if len(y) == len(x) else None)
        res["models"] = {"base": base, "tuned": tuned}
        res.update(data=data, eval_data=eval_data or data, bank_path=str(bank.path))
        jpath, ppath = write_report(res, out, title=f"{tuned} vs {base} on {data}")
        hand = f", hand-over FID Spearman {res['handover_spearman']:.2f}" if "handover" in res else ""
        typer.echo(f"bank-loss forgetting Spearman(t) {res['forgetting_spearman']:.2f}{hand}; wrote {jpath}, {ppath}")
