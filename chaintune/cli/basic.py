"""``chaintune sample`` (``chaintune pretrain`` is generated from its config in ``chaintune.cli.pretrain``)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from chaintune.options import INT64


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
        seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=INT64[1])] = 0,
        label: Annotated[int | None, typer.Option(help="Class label (class-conditional models).")] = None,
        prompt: Annotated[str | None, typer.Option(help="Prompt (text-conditional models).")] = None,
        guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
        batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 64,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: best available).")]
        = None,
        allow_pickle: Annotated[bool, typer.Option(help="Allow pickled (.bin/.pt) weights; only for files you trust.")]
        = False,
        overwrite: Annotated[bool, typer.Option(
            help="Replace existing sample PNGs and grid.png in --out (other files there are kept).")] = False,
        video_shape: Annotated[str | None, typer.Option(
            help="Video models: sample FRAMESxHEIGHTxWIDTH pixels (default: the size the model was saved at).")]
        = None,
        controlnet: Annotated[str | None, typer.Option(
            help="A `chaintune controlnet` run (or its model/, or a bare ControlNetModel dir over --model) that "
            "steers the samples; needs --condition.")] = None,
        condition: Annotated[Path | None, typer.Option(
            help="With --controlnet: an image (grey, RGB, RGBA or 16-bit) whose edges/silhouette, the kind the "
            "ControlNet was trained on, every sample follows.")] = None,
    ):
        """Sample images from a model and write PNGs plus a grid."""
        import torch

        import chaintune
        from chaintune.utils.images import save_grid, save_images
        from chaintune.utils.io import check_output_dir
        from chaintune.utils.threads import apply_thread_policy, threads_from_env

        _check_sample_options(num=num, steps=steps, eta=eta, scheduler=scheduler, batch_size=batch_size,
                              guidance_scale=guidance_scale)
        threads_from_env()  # a bad CHAINTUNE_THREADS fails here, not after the model has loaded
        check_output_dir(out)  # before the model loads: cheap errors first
        dev = _device(device)
        with _locked_out(out):
            _check_sample_outputs(out, num, overwrite)  # under the lock: no other sampler writes them meanwhile
            if controlnet is not None or condition is not None:
                from chaintune.controlnet.sample import sample_command

                sample_command(controlnet, condition, model=model, num=num, out=out, steps=steps, eta=eta,
                               scheduler=scheduler, seed=seed, label=label, prompt=prompt,
                               guidance_scale=guidance_scale, batch_size=batch_size, device=dev,
                               allow_pickle=allow_pickle)
                return
            m = chaintune.load(model, device=dev, allow_pickle=allow_pickle, video_shape=video_shape)
            apply_thread_policy(m)  # 1 thread for small models, the free cores for big ones (benchmarks/threads.py)
            _check_conditions(m, label=label, prompt=prompt, steps=steps)
            check_sample_memory(m, num, steps)
            prompts = prompt if prompt is not None else _default_prompts(m, num)
            t0 = time.time()
            traj = chaintune.sample(m, num, steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed),
                                    labels=label, prompts=prompts, guidance_scale=guidance_scale,
                                    scheduler=scheduler, batch_size=batch_size)
            dt = time.time() - t0
            save_images(traj.images, out)  # one atomic write per file: never a half-written PNG
            grid = save_grid(traj.images, out / "grid.png")
        typer.echo(f"wrote {num} samples to {out}/ and {grid} ({dt:.1f}s, {steps} steps)")


def _default_prompts(m, num: int) -> list[str] | None:
    """Without --prompt, a prompt model samples the prompts it ships (``default_prompts``, as align trains on),
    in order and repeated; the empty prompt only when it ships none."""
    source = getattr(m, "default_prompts", None)
    if not m.takes_prompts or not source:
        return None
    from chaintune.prompts import load_prompts

    pool = load_prompts(source).prompts
    typer.echo(f"prompts: the model's default prompts ({source}, {len(pool)}); choose one with --prompt")
    return [pool[i % len(pool)] for i in range(num)]


def _check_sample_options(*, num: int, steps: int, eta: float, scheduler: str, batch_size: int,
                          guidance_scale: float | None = None) -> None:
    """Reject bad numbers before loading anything (one ``error:`` line, not an error deep in the sampler)."""
    from chaintune.errors import ChaintuneError, unknown_name

    for name, value in (("--num", num), ("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ChaintuneError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(eta) and eta >= 0):  # `nan < 0` is False: test the good range, not the bad one
        raise ChaintuneError(f"--eta must be a finite number >= 0, got {eta}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ChaintuneError(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if scheduler not in ("ddim", "ddpm"):
        raise unknown_name("scheduler", scheduler, ["ddim", "ddpm"])


_OUTPUT = re.compile(r"sample_(\d{4,})\.(png|gif)|grid\.(png|gif)")


def existing_outputs(out: Path, num: int) -> list[Path]:
    """The files of ``out`` that ``chaintune sample --num num`` writes (``sample_0000.png`` ... as ``save_images``
    names them, GIFs for videos, and the grid), found by listing ``out``: never a list of every name it could
    write, which for a huge ``--num`` would not fit in memory."""
    if not out.is_dir():
        return []
    found = []
    for name in os.listdir(out):
        m = _OUTPUT.fullmatch(name)
        index = m and m.group(1)
        if m and (index is None or (int(index) < num and index == f"{int(index):04d}")):
            found.append(out / name)
    return sorted(found)


def _check_sample_outputs(out: Path, num: int, overwrite: bool) -> None:
    """Existing samples of the same names are someone's results: replaced only with --overwrite."""
    from chaintune.utils.io import check_overwrite

    check_overwrite(existing_outputs(out, num), overwrite)


@contextlib.contextmanager
def _locked_out(out: Path) -> Iterator[None]:
    """Hold ``out`` for the command, locked as the trainers lock a run (:class:`~chaintune.run.rundir.RunLock`,
    an ``flock`` on the folder), so that two samplers into one folder never interleave their files. The folders
    created for it are removed again when the command fails before writing into them."""
    from chaintune.errors import ChaintuneError
    from chaintune.run.rundir import RunLock
    from chaintune.utils.io import lock_holder

    made = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        try:
            lock.acquire()
        except ChaintuneError:
            who = lock_holder(out)
            if not who:
                raise
            raise ChaintuneError(f"{out} is being written by another chaintune process ({who}); wait for it or "
                                 "choose another --out") from None
        yield
    except BaseException:
        for p in made:  # deepest first; stops at the first folder that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    finally:
        lock.release()


def check_sample_memory(m, num: int, steps: int) -> None:
    """Refuse a --num whose samples cannot be held in memory: ``chaintune.sample`` keeps every sample's whole chain
    (latents, means, noise and x0-predictions of each of the ``steps`` steps) and its image until they are written,
    so the count is bounded by the free memory of the device the model is on."""
    import torch

    from chaintune.errors import ChaintuneError

    free = _free_memory(m.device)
    if free is None:
        return
    latent = math.prod(m.latent_shape) * torch.finfo(m.dtype).bits // 8
    image = math.prod(m.pixel_shape) * 4 * (getattr(m, "num_frames", 1) if m.produces_video else 1)
    need = num * ((4 * steps + 2) * latent + image)
    if need > free:
        fits = max(0, free // ((4 * steps + 2) * latent + image))
        raise ChaintuneError(f"--num {num} needs about {need / 2**30:,.1f} GiB to hold the samples' chains at --steps "
                             f"{steps}, and {free / 2**30:,.1f} GiB is free on {m.device}; sample at most {fits} at "
                             "a time (into several --out folders, with different --seed)")


def _free_memory(device) -> int | None:
    """Bytes free on ``device``: the GPU's free memory, or the host's MemAvailable; None where unknown."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _device(device: str | None) -> str:
    import torch

    from chaintune.errors import ChaintuneError

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ChaintuneError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps ...): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChaintuneError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ChaintuneError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _check_conditions(m, *, label: int | None, prompt: str | None, steps: int) -> None:
    """--label/--prompt/--steps against what the loaded model takes."""
    from chaintune.errors import ChaintuneError

    if label is not None:
        if not m.takes_labels:
            raise ChaintuneError(f"{m.kind} model {m.source!r} is not class-conditional; drop --label")
        if not 0 <= label < m.num_classes:
            raise ChaintuneError(f"--label must be in 0..{m.num_classes - 1} for {m.source!r}, got {label}")
    if prompt is not None and not m.takes_prompts:
        what = "class labels (--label)" if m.takes_labels else "no conditions"
        raise ChaintuneError(f"{m.kind} model {m.source!r} takes {what}, not prompts; drop --prompt")
    config = getattr(m.scheduler, "config", None)
    limit = config.get("num_train_timesteps") if hasattr(config, "get") else None
    if isinstance(limit, int) and steps > limit:
        raise ChaintuneError(f"--steps must be at most {limit} (the model's training timesteps), got {steps}")
