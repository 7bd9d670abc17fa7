"""Dataset ids: rendered glyphs, few-shot digits, image folders of any size/mode."""

import numpy as np
import pytest
import torch
from PIL import Image

from chaintune.data import load_dataset
from chaintune.data.folder import load_folder
from chaintune.errors import ChaintuneError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, loaded CPU two OpenMP threads spin-wait (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_glyphs_render_white_on_black_8x8():
    from chaintune.data.fonts import font_files, glyph_images

    assert len(font_files()) >= 10
    x, y = glyph_images("all", per_class=4, seed=3)
    assert x.shape == (40, 1, 8, 8) and y.bincount().tolist() == [4] * 10
    assert 0 <= x.min() and x.max() <= 1
    border = torch.cat([x[..., 0, :], x[..., -1, :]], -1).mean()
    centre = x[..., 2:6, 2:6].mean()
    assert centre > border  # glyph in the middle, background black
    x2, _ = glyph_images("all", per_class=4, seed=3)
    assert torch.equal(x, x2)  # deterministic


def test_glyphs_splits_are_disjoint_and_resizable():
    tr, _ = load_dataset("glyphs:train")
    te, yte = load_dataset("glyphs:test")
    assert len(tr) + len(te) == len(load_dataset("glyphs")[0])
    assert set(yte.tolist()) == set(range(10))
    assert load_dataset("glyphs:test", size=16)[0].shape[-1] == 16


def test_digits_fewshot_counts_and_nesting():
    x10, y10 = load_dataset("digits-fewshot:10")
    assert x10.shape == (100, 1, 8, 8) and y10.bincount().tolist() == [10] * 10
    x3, _ = load_dataset("digits-fewshot:3")
    rows10 = {tuple(r.flatten().tolist()) for r in x10}
    assert all(tuple(r.flatten().tolist()) in rows10 for r in x3)  # fixed seed: K=3 is inside K=10
    train, _ = load_dataset("digits:train")
    assert torch.equal(load_dataset("digits-fewshot:10")[0], x10)
    assert len(train) > 1000
    with pytest.raises(ChaintuneError, match="shot count"):
        load_dataset("digits-fewshot:many")


def test_digit_class_ranges_split_train_test_and_fewshot():
    """digits-AtoB keeps classes A..B of the fixed split; digits-fewshot-AtoB:K is digits-fewshot:K's subset."""
    lo_tr, ylo = load_dataset("digits-0to4:train")
    hi_tr, yhi = load_dataset("digits-5to9:train")
    hi_te, yte = load_dataset("digits-5to9:test")
    assert set(ylo.tolist()) == set(range(5)) and set(yhi.tolist()) == set(yte.tolist()) == set(range(5, 10))
    train, ytrain = load_dataset("digits:train")
    assert len(lo_tr) + len(hi_tr) == len(train) and torch.equal(hi_tr, train[ytrain >= 5])
    rows = lambda x: {tuple(r.flatten().tolist()) for r in x}  # noqa: E731
    assert not rows(hi_te) & rows(hi_tr)  # held-out test images never appear in training
    assert len(load_dataset("digits-0to4")[0]) == int((load_dataset("digits")[1] <= 4).sum())
    few, yfew = load_dataset("digits-fewshot-5to9:10")
    assert few.shape == (50, 1, 8, 8) and yfew.bincount(minlength=10)[5:].tolist() == [10] * 5
    x10, y10 = load_dataset("digits-fewshot:10")
    assert torch.equal(few, x10[y10 >= 5]) and rows(few) <= rows(hi_tr)
    assert load_dataset("digits-5to9:test", size=16)[0].shape[-1] == 16
    for bad, msg in (("digits-5to9:val", "unknown split"), ("digits-7to2", "empty"),
                     ("digits-fewshot-5to9:x", "shot count")):
        with pytest.raises(ChaintuneError, match=msg):
            load_dataset(bad)


def test_unknown_dataset_is_one_clear_error():
    with pytest.raises(ChaintuneError, match="did you mean 'glyphs"):
        load_dataset("glyhs")


def _write_mixed(root):
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (5, 7), dtype=np.uint8), "L").save(root / "a.png")
    Image.fromarray(rng.randint(0, 255, (20, 10, 3), dtype=np.uint8), "RGB").save(root / "b.jpg")
    Image.fromarray(rng.randint(0, 255, (9, 9, 4), dtype=np.uint8), "RGBA").save(root / "c.png")
    Image.fromarray(rng.randint(0, 255, (12, 12), dtype=np.uint8), "L").convert("P").save(root / "d.gif")
    Image.fromarray(rng.randint(0, 60000, (6, 6)).astype(np.uint16)).save(root / "e.png")  # 16-bit gray


def test_folder_of_mixed_sizes_and_modes(tmp_path):
    _write_mixed(tmp_path)
    x, y = load_folder(tmp_path, 8)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and (y == 0).all()
    gray, _ = load_folder(tmp_path, 16, channels=1)
    assert gray.shape == (5, 1, 16, 16)
    via_registry, _ = load_dataset(str(tmp_path), size=8)
    assert torch.equal(via_registry, x)


def test_folder_all_gray_stays_one_channel_and_class_subfolders(tmp_path):
    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(k + 2):
            Image.new("L", (10 + i, 4), color=40 * i).save(tmp_path / cls / f"{i}.png")
    x, y = load_folder(tmp_path, 8)
    assert x.shape == (5, 1, 8, 8)
    assert y.tolist() == [0, 0, 1, 1, 1]


def test_unreadable_files_are_named_in_one_error(tmp_path):
    _write_mixed(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(ChaintuneError) as e:
        load_folder(tmp_path, 8)
    msg = str(e.value)
    assert "2 unreadable" in msg and "broken.png" in msg and "truncated.jpg" in msg and "\n" not in msg


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ChaintuneError, match="no images"):
        load_folder(tmp_path, 8)
    with pytest.raises(ChaintuneError, match="does not exist"):
        load_folder(tmp_path / "nope", 8)
