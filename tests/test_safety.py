"""Never lose a user's files, never run code from a file without an opt-in.

* ``sample``/``forgetting`` refuse to replace outputs of the same names without ``--overwrite``, and with it
  replace only those files;
* pickled weights are checked per component folder (a ``.safetensors`` in ``vae/`` does not make a pickled
  ``unet/`` safe);
* a TorchScript ``inception:/path`` (pickles inside) loads only with ``allow_pickle``/``CHAINTUNE_ALLOW_PICKLE=1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_bad_input import assert_one_line_error, run_cli

from chaintune.errors import ChaintuneError
from chaintune.utils.io import ALLOW_PICKLE_ENV


@pytest.fixture(autouse=True)
def _no_pickle_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)


# --- sample / forgetting outputs -----------------------------------------------------------------------------


def _fail_if_loaded(monkeypatch) -> None:
    """The output check must come before the (expensive) model load."""
    import chaintune

    def boom(*a, **kw):
        raise AssertionError("the model was loaded before the output check")

    monkeypatch.setattr(chaintune, "load", boom)


@pytest.mark.parametrize("existing", ["sample_0001.png", "grid.png"])
def test_sample_refuses_existing_outputs_before_loading(capsys, tmp_path, monkeypatch, existing):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / existing).write_bytes(b"precious")
    _fail_if_loaded(monkeypatch)
    code, _, err = run_cli(capsys, "sample", "--num", "2", "--steps", "2", "--out", "s")
    assert code == 2
    assert_one_line_error(code, err, existing, "already exists", "--overwrite")
    assert (tmp_path / "s" / existing).read_bytes() == b"precious"


def test_sample_out_is_a_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s").write_text("not a folder")
    _fail_if_loaded(monkeypatch)
    code, _, err = run_cli(capsys, "sample", "--num", "2", "--steps", "2", "--out", "s/deeper")
    assert code == 2
    assert_one_line_error(code, err, "lies under the file")
    assert (tmp_path / "s").read_text() == "not a folder"


def test_sample_overwrite_replaces_only_its_files(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s"
    out.mkdir()
    (out / "grid.png").write_bytes(b"old grid")
    (out / "notes.txt").write_text("keep")
    (out / "sample_0005.png").write_bytes(b"from a bigger earlier run")
    code, _, err = run_cli(capsys, "sample", "--num", "2", "--steps", "2", "--out", "s", "--overwrite")
    assert code == 0, err
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sample_0000.png").exists() and (out / "sample_0001.png").exists()
    assert (out / "notes.txt").read_text() == "keep"
    assert (out / "sample_0005.png").read_bytes() == b"from a bigger earlier run"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_sample_never_replaces_a_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s" / "grid.png").mkdir(parents=True)
    (tmp_path / "s" / "grid.png" / "x.txt").write_text("keep")
    _fail_if_loaded(monkeypatch)
    code, _, err = run_cli(capsys, "sample", "--num", "1", "--steps", "2", "--out", "s", "--overwrite")
    assert code == 2
    assert_one_line_error(code, err, "grid.png", "is a folder")
    assert (tmp_path / "s" / "grid.png" / "x.txt").read_text() == "keep"


FORGET = ["forgetting", "--base", "builtin:digits", "--tuned", "builtin:digits", "--data", "digits:test",
          "--samples", "0", "--timesteps", "2", "--bank-size", "2", "--out", "f"]


def test_forgetting_refuses_existing_report_before_loading(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "forgetting.png").write_bytes(b"precious")
    _fail_if_loaded(monkeypatch)
    code, _, err = run_cli(capsys, *FORGET)
    assert code == 2
    assert_one_line_error(code, err, "forgetting.png", "already exists", "--overwrite")
    assert (tmp_path / "f" / "forgetting.png").read_bytes() == b"precious"


def test_forgetting_overwrite_replaces_only_its_files(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHAINTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "f"
    out.mkdir()
    (out / "forgetting.json").write_text("{}")
    (out / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, *FORGET, "--overwrite")
    assert code == 0, err
    import json

    assert "timesteps" in json.loads((out / "forgetting.json").read_text())
    assert (out / "forgetting.png").exists()
    assert (out / "notes.txt").read_text() == "keep"


def test_save_images_is_atomic(tmp_path, monkeypatch):
    """A failure while encoding a PNG leaves the old file as it was and no temp file."""
    from PIL import Image

    from chaintune.utils.images import save_grid, save_images

    (tmp_path / "sample_0000.png").write_bytes(b"old")
    (tmp_path / "grid.png").write_bytes(b"old grid")

    def broken_save(self, fp, *a, **kw):
        fp.write(b"\x89PNG half")
        raise OSError("disk went away")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_images(torch.rand(2, 1, 8, 8), tmp_path)
    with pytest.raises(OSError):
        save_grid(torch.rand(2, 1, 8, 8), tmp_path / "grid.png")
    assert (tmp_path / "sample_0000.png").read_bytes() == b"old"
    assert (tmp_path / "grid.png").read_bytes() == b"old grid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "sample_0000.png"]


# --- pickled weights, per component folder ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline saved with safetensors in every component folder."""
    from chaintune.testing import tiny_sd_pipeline

    d = tmp_path_factory.mktemp("sd") / "pipe"
    tiny_sd_pipeline().save_pretrained(d, safe_serialization=True)
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_each_folder_with_safetensors_loads(sd_dir):
    import chaintune

    assert list((sd_dir / "unet").glob("*.safetensors")) and list((sd_dir / "vae").glob("*.safetensors"))
    m = chaintune.load(sd_dir)
    assert m.takes_prompts


def _pickle_the_unet(d: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(d / "unet")
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(d / "unet", safe_serialization=False)
    assert list((d / "unet").glob("*.bin")) and not list((d / "unet").glob("*.safetensors"))


def test_pickled_component_refused_despite_safetensors_elsewhere(sd_dir, tmp_path, monkeypatch):
    import chaintune

    d = _copy(sd_dir, tmp_path / "pipe")
    _pickle_the_unet(d)
    assert list((d / "vae").glob("*.safetensors"))  # safetensors elsewhere must not make unet/ safe
    with pytest.raises(ChaintuneError, match=r"unet/.*pickled.*--allow-pickle"):
        chaintune.load(d)
    # the opt-ins load it, from the pickle (the refusal was about a file that really loads)
    assert chaintune.load(d, allow_pickle=True).takes_prompts
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    assert chaintune.load(d).takes_prompts


def test_pickle_check_per_folder_rules(tmp_path):
    from chaintune.backends import check_safe_weights

    d = tmp_path / "m"
    for sub, names in {"unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.bin"],
                       "text_encoder": ["model.safetensors", "pytorch_model.bin"],
                       "tokenizer": ["vocab.json"], "scheduler": ["scheduler_config.json"]}.items():
        (d / sub).mkdir(parents=True)
        for n in names:
            (d / sub / n).write_bytes(b"")
    check_safe_weights(d)  # every pickle has safetensors beside it: those load, not the pickles
    (d / "vae").mkdir()
    (d / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    (d / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ChaintuneError, match=r"vae/.*diffusion_pytorch_model\.bin"):
        check_safe_weights(d)  # a variant is not what loads without variant=
    check_safe_weights(d, allow_pickle=True)


def test_pickled_component_refused_in_cli(capsys, sd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = _copy(sd_dir, tmp_path / "pipe")
    _pickle_the_unet(d)
    code, _, err = run_cli(capsys, "sample", "--model", str(d), "--num", "1", "--steps", "2", "--out", "s")
    assert code == 2
    assert_one_line_error(code, err, "unet/", "pickled", "--allow-pickle")
    assert not (tmp_path / "s").exists()


# --- TorchScript feature network ----------------------------------------------------------------------------


class _ScriptedInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


@pytest.fixture
def scripted(tmp_path) -> Path:
    p = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_ScriptedInception()), str(p))
    return p


def test_torchscript_features_need_opt_in(scripted, monkeypatch):
    from chaintune.metrics import feature_network, fid_kid

    ran = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **kw: ran.append(a) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ChaintuneError, match=r"runs? code.*--allow-pickle.*CHAINTUNE_ALLOW_PICKLE=1"):
        feature_network(f"inception:{scripted}")
    with pytest.raises(ChaintuneError, match="--allow-pickle"):
        fid_kid(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), f"inception:{scripted}")
    monkeypatch.setenv("CHAINTUNE_INCEPTION_WEIGHTS", str(scripted))
    with pytest.raises(ChaintuneError, match="--allow-pickle"):
        feature_network("inception")
    assert not ran, "torch.jit.load ran without the opt-in"


@pytest.mark.parametrize("how", ["argument", "env"])
def test_torchscript_features_load_with_opt_in(scripted, monkeypatch, how):
    from chaintune.metrics import feature_network, fid_kid

    if how == "env":
        monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    net = feature_network(f"inception:{scripted}", allow_pickle=how == "argument")
    assert net.num_features == 2048
    assert net(torch.rand(3, 1, 8, 8)).shape == (3, 2048)
    r = fid_kid(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), f"inception:{scripted}",
                allow_pickle=how == "argument", kid_subsets=2)
    assert r["fid"] >= 0


def test_forgetting_inception_refused_before_loading(capsys, scripted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fail_if_loaded(monkeypatch)
    # the later --samples 2 wins: the FID feature network is needed, so it is checked before any model loads
    code, _, err = run_cli(capsys, *FORGET, "--samples", "2", "--feature", f"inception:{scripted}")
    assert code == 2
    assert_one_line_error(code, err, "--allow-pickle")


def test_a_run_whose_model_is_pickled_loads_with_the_allow_pickle_argument(sd_dir, tmp_path):
    """``load(run, allow_pickle=True)`` reaches the run's model/ (it used to load it with the default, False)."""
    import chaintune
    from chaintune.backends import RUN_MARKER

    run = tmp_path / "run"
    run.mkdir()
    d = _copy(sd_dir, run / "model")
    _pickle_the_unet(d)
    (run / RUN_MARKER).write_text('{"command": "align", "status": "done"}')
    with pytest.raises(ChaintuneError, match=r"pickled"):
        chaintune.load(run)
    assert chaintune.load(run, allow_pickle=True).takes_prompts
