"""``chaintune sample`` and ``chaintune pretrain``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def sample(
        model: Annotated[str, typer.Option(help="Model id: builtin:NAME, a diffusers dir, a run dir or a hub id.")]
        = "builtin:digits",
        num: Annotated[int, typer.Option("--num", "-n", help="Number of images.")] = 64,
        out: Annotated[Path, typer.Option(help="Output directory (one PNG per sample + grid.png).")]
        = Path("out/samples"),
        steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
        eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic, 1 = DDPM-like noise).")] = 1.0,
        scheduler: Annotated[str, typer.Option(help="ddim or ddpm.")] = "ddim",
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
        label: Annotated[int | None, typer.Option(help="Class label (class-conditional models).")] = None,
        prompt: Annotated[str | None, typer.Option(help="Prompt (text-conditional models).")] = None,
        guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
        batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 64,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best available).")]
        = None,
        allow_pickle: Annotated[bool, typer.Option(help="Allow pickled (.bin/.pt) weights; only for files you trust.")]
        = False,
    ):
        """Sample images from a model and write PNGs plus a grid."""
        import torch

        import chaintune
        from chaintune.utils.images import save_grid, save_images

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        m = chaintune.load(model, device=dev, allow_pickle=allow_pickle)
        t0 = time.time()
        traj = chaintune.sample(m, num, steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed),
                                labels=label, prompts=prompt, guidance_scale=guidance_scale,
                                scheduler=scheduler, batch_size=batch_size)
        dt = time.time() - t0
        save_images(traj.images, out)
        grid = save_grid(traj.images, out / "grid.png")
        typer.echo(f"wrote {num} samples to {out}/ and {grid} ({dt:.1f}s, {steps} steps)")

    @app.command()
    def pretrain(
        out: Annotated[Path, typer.Option(help="Output directory (a diffusers DDPMPipeline).")],
        config: Annotated[Path | None, typer.Option(help="YAML/TOML config (see chaintune/configs/).")] = None,
        dataset: Annotated[str | None, typer.Option(help="Dataset id (digits:train, glyphs, a folder).")]
        = None,
        steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
        seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    ):
        """Train a small pixel DDPM from scratch (how builtin:digits is made)."""
        from chaintune.errors import ChaintuneError
        from chaintune.training.pretrain import PretrainConfig
        from chaintune.training.pretrain import pretrain as run
        from chaintune.utils.io import load_config_file, strict_config

        values = load_config_file(config) if config else {}
        strict_config(PretrainConfig, values, "pretrain option")  # typos fail before anything is written
        for k, v in (("dataset", dataset), ("steps", steps), ("seed", seed)):
            if v is not None:
                values[k] = v
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ChaintuneError(f"{out} already exists; pass --overwrite to replace it")
        run(strict_config(PretrainConfig, values, "pretrain option"), out=out)
        typer.echo(f"saved model to {out}")
