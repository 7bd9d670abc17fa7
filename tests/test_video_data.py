"""Video target data for transfer: folders of clips (GIF/APNG/.npy, sidecar prompts), the moving-digits ids,
and ``chaintune transfer --data`` on builtin:moving-digits end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import chaintune
from chaintune.data import load_dataset
from chaintune.data.moving import DIRECTIONS, all_prompts, moving_digits, parse_prompt
from chaintune.data.registry import LabelledData
from chaintune.data.video_folder import frame_indices, load_video_folder
from chaintune.errors import ChaintuneError
from chaintune.transfer.data import load_target

SHAPE = (8, 1, 16, 16)  # builtin:moving-digits: (frames, channels, height, width)


def save_gif(path: Path, frames: np.ndarray, prompt: str | None = None) -> Path:
    """[F, H, W] uint8 as an animated grayscale GIF (frames must differ: PIL merges repeated ones)."""
    pils = [Image.fromarray(f, mode="L") for f in frames]
    pils[0].save(path, save_all=True, append_images=pils[1:], duration=100, loop=0)
    if prompt is not None:
        path.with_suffix(".txt").write_text(prompt + "\n")
    return path


def ramp(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """[n, h, w] uint8 clip whose frame i is the constant 10 * i (which frame survived is readable)."""
    return np.stack([np.full((h, w), 10 * i, np.uint8) for i in range(n)])


def clip_gifs(root: Path, n: int = 6) -> list[str]:
    """``n`` moving-digits clips as GIFs with sidecar prompts in ``root``; returns their prompts."""
    root.mkdir(parents=True, exist_ok=True)
    clips, prompts = moving_digits(n, "train", generator=torch.Generator().manual_seed(0))
    for i, (c, p) in enumerate(zip(clips, prompts, strict=True)):
        save_gif(root / f"clip{i}.gif", (c[:, 0].numpy() * 255).round().astype(np.uint8), p)
    return prompts


@pytest.fixture(scope="module")
def moving_model():
    return chaintune.load("builtin:moving-digits")


def test_folder_of_gif_apng_npy_clips(tmp_path):
    save_gif(tmp_path / "a.gif", ramp(8), "a 1 moving left")
    rgb = np.random.default_rng(0).integers(0, 256, (8, 20, 24, 3), dtype=np.uint8)
    apng = [Image.fromarray(f) for f in rgb]
    apng[0].save(tmp_path / "b.png", save_all=True, append_images=apng[1:], duration=100)
    (tmp_path / "b.txt").write_text("a 2 moving up\n")
    np.save(tmp_path / "c.npy", np.linspace(0, 1, 8 * 32 * 32, dtype=np.float32).reshape(8, 32, 32))
    (tmp_path / "c.txt").write_text("  a 1 moving\n left \n")  # whitespace collapses
    (tmp_path / "notes.md").write_text("not a clip")
    d = load_video_folder(tmp_path, SHAPE)
    x, y = d
    assert isinstance(d, LabelledData) and d.prompted
    assert x.shape == (3, 8, 1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 1, 0] and [d.classes[i] for i in y] == ["a 1 moving left", "a 2 moving up",
                                                                      "a 1 moving left"]
    torch.testing.assert_close(x[0, :, 0, 0, 0], torch.arange(8) * 10 / 255)  # exact gray levels survive
    luma = (rgb[0].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean() / 255
    assert abs(float(x[1, 0].mean()) - luma) < 0.02  # RGB frames become luma, resized without cropping
    x3 = load_video_folder(tmp_path, (8, 3, 8, 12))[0]
    assert x3.shape == (3, 8, 3, 8, 12) and torch.equal(x3[0, :, 0], x3[0, :, 2])  # gray clips repeat to RGB


def test_longer_clips_are_subsampled_uniformly(tmp_path):
    save_gif(tmp_path / "long.gif", ramp(16))
    np.save(tmp_path / "long.npy", ramp(12)[..., None])  # [F, H, W, 1] uint8
    x, y = d = load_video_folder(tmp_path, SHAPE)
    assert not d.prompted and d.classes is None and y.tolist() == [0, 0]
    assert frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14] and frame_indices(12, 8) == [0, 1, 3, 4, 6, 7, 9, 10]
    levels = (x[:, :, 0, 0, 0] * 255).round().long().tolist()
    assert levels == [[10 * i for i in frame_indices(16, 8)], [10 * i for i in frame_indices(12, 8)]]


def test_short_and_unreadable_clips_are_one_error(tmp_path):
    save_gif(tmp_path / "ok.gif", ramp(8))
    save_gif(tmp_path / "short.gif", ramp(5))
    np.save(tmp_path / "short.npy", ramp(3))
    (tmp_path / "broken.gif").write_bytes(b"GIF89a not really")
    np.save(tmp_path / "hot.npy", np.full((8, 4, 4), 2.0, np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((8, 4, 4), np.int64))
    with pytest.raises(ChaintuneError) as e:
        load_video_folder(tmp_path, SHAPE)
    msg = str(e.value)
    assert "3 unreadable clip file(s)" in msg and "broken.gif" in msg and "hot.npy (float values in [2, 2]" in msg
    assert "ints.npy (dtype int64" in msg
    assert "2 clip(s) shorter than the model's 8 frames" in msg and "short.gif (5 frames)" in msg
    assert "short.npy (3 frames)" in msg and "ok.gif" not in msg and "\n" not in msg


def test_folder_layout_errors_and_class_subfolders(tmp_path):
    (tmp_path / "cats").mkdir()
    save_gif(tmp_path / "cats" / "c.gif", ramp(8))
    save_gif(tmp_path / "stray.gif", ramp(8))
    with pytest.raises(ChaintuneError, match="mixes clips and class subfolders"):
        load_video_folder(tmp_path, SHAPE)
    (tmp_path / "stray.gif").unlink()
    (tmp_path / "dogs").mkdir()
    save_gif(tmp_path / "dogs" / "d1.gif", ramp(9))
    np.save(tmp_path / "dogs" / "d2.npy", ramp(8))
    d = load_video_folder(tmp_path, SHAPE)  # no prompts: labels and names from the class folders
    assert not d.prompted and d.classes == ["cats", "dogs"] and d[1].tolist() == [0, 1, 1]
    (tmp_path / "dogs" / "d1.txt").write_text("a dog")
    with pytest.raises(ChaintuneError, match=r"2 of 3 clips .* have no prompt file .*cats/c.gif; dogs/d2.npy"):
        load_video_folder(tmp_path, SHAPE)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.mp4").write_bytes(b"")
    with pytest.raises(ChaintuneError, match=r"no clips .*\(\.mp4, \.\.\.\) are not read"):
        load_video_folder(empty, SHAPE)


def test_moving_digits_ids(moving_model):
    x, y = d = load_target(moving_model, "moving-digits:test")
    assert x.shape == (449, *SHAPE) and d.prompted and set(d.classes) <= set(all_prompts()) and len(d.classes) == 80
    again = load_dataset("moving-digits:test", video=SHAPE)
    assert torch.equal(again[0], x) and again.classes == d.classes  # a fixed split: the same clips every run
    assert len(load_dataset("moving-digits:train", video=SHAPE)[0]) == 1348
    # each clip moves as its prompt says: the digit's centre of mass travels speed * 7 px along the direction
    grid = torch.arange(16.0)
    mass = x[:, :, 0].sum((-1, -2))
    cx, cy = (x[:, :, 0].sum(-2) * grid).sum(-1) / mass, (x[:, :, 0].sum(-1) * grid).sum(-1) / mass
    moved = torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], 1)
    want = torch.tensor([[v * 7 * parse_prompt(d.classes[k]).speed for v in DIRECTIONS[parse_prompt(d.classes[k])
                        .direction]] for k in y.tolist()])
    assert (moved - want).abs().max() < 0.5
    with pytest.raises(ChaintuneError, match="holds images but this is a video model"):
        load_target(moving_model, "digits:train")
    with pytest.raises(ChaintuneError, match="holds video clips"):
        load_dataset("moving-digits:train", size=8)


def test_transfer_trains_each_clip_on_its_prompt(tmp_path, moving_model, monkeypatch):
    import chaintune.transfer.trainer as trainer_mod
    from chaintune.transfer import transfer

    prompts = clip_gifs(tmp_path / "clips")
    seen: list[str] = []
    real = trainer_mod.target_conditions

    def spy(*args, **kw):
        cond = real(*args, **kw)
        seen.extend(cond.prompts)
        return cond

    monkeypatch.setattr(trainer_mod, "target_conditions", spy)
    cfg = {"data": str(tmp_path / "clips"), "method": "plain", "steps": 2, "batch_size": 4, "label_dropout": 0.0,
           "log_every": 1}
    res = transfer(cfg, model=moving_model, show_progress=False)
    assert len(res.history) == 2 and len(seen) == 8 and set(seen) <= set(prompts)


def test_cli_transfer_on_a_folder_of_gifs(tmp_path, capsys):
    from chaintune.cli.main import main

    clip_gifs(tmp_path / "clips")
    out = tmp_path / "run"
    args = ["transfer", "--model", "builtin:moving-digits", "--data", str(tmp_path / "clips"), "--steps", "2",
            "--batch-size", "5", "--bank-size", "2", "--bank-steps", "2", "--bank-dir", str(tmp_path / "bank"),
            "--sample-steps", "2", "--grid-samples", "2", "--eval-samples", "2", "--no-tensorboard",
            "--no-progress", "--no-report"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHAINTUNE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "chaintune.cli.main", *args, "--out", str(out)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=Path(__file__).parent)
    assert p.returncode == 0, p.stderr
    assert (out / "model" / "chaintune_video.json").is_file() and (out / "samples" / "step_000002.gif").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1

    bad = tmp_path / "bad"
    bad.mkdir()
    save_gif(bad / "short.gif", ramp(4))
    (bad / "broken.gif").write_bytes(b"nope")
    with pytest.raises(SystemExit) as e:
        main([*args, "--data", str(bad), "--out", str(tmp_path / "run2")])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "broken.gif" in errors[0] and "short.gif (4 frames)" in errors[0]
