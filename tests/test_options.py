"""Every option is defined once (chaintune.options) and reaches --help, config files and config.yaml."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import yaml
from typer.testing import CliRunner

from chaintune.align.config import AlignConfig
from chaintune.cli.basic import SampleConfig
from chaintune.errors import ChaintuneError
from chaintune.options import from_dict, option, section, specs, to_dict
from chaintune.pretrain.config import PretrainConfig
from chaintune.transfer.config import TransferConfig

COMMANDS = {"align": AlignConfig, "transfer": TransferConfig, "pretrain": PretrainConfig, "sample": SampleConfig}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_appears_in_help(command):
    from chaintune.cli.main import app

    res = CliRunner().invoke(app, [command, "--help"], terminal_width=80)
    assert res.exit_code == 0, res.output
    text = res.output
    for s in specs(COMMANDS[command]()):
        flag = "--" + s.name.replace("_", "-")
        assert flag in text, f"{command} --help lacks {flag}"
        assert s.help.split()[0] in text  # and its help text
    assert "…" not in text  # nothing cut at 80 columns


@pytest.mark.parametrize("cls", list(COMMANDS.values()))
def test_config_yaml_round_trips_and_flat_equals_nested(cls):
    cfg = cls()
    nested = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    assert from_dict(cls, nested) == cfg
    flat = {s.name: s.default for s in specs(cfg)}
    assert from_dict(cls, flat) == cfg


def test_sample_reads_a_config_file_and_flags_override_it(tmp_path, monkeypatch):
    from chaintune.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("num: 3\nsteps: 2\nout: from_file\nseed: 5\n")
    main(["sample", "--config", "s.yaml"])
    assert len(list((tmp_path / "from_file").glob("sample_*.png"))) == 3
    main(["sample", "--config", "s.yaml", "--num", "2", "--out", "from_flags"])
    assert len(list((tmp_path / "from_flags").glob("sample_*.png"))) == 2
    with pytest.raises(SystemExit) as e:
        main(["sample", "--resume", "--out", "x"])  # sample writes no run: there is nothing to resume
    assert e.value.code == 2


def test_flat_and_nested_keys_set_the_same_field():
    a = AlignConfig.from_dict({"lr": 1e-3, "estimator": "reinforce", "inner_epochs": 2})
    b = AlignConfig.from_dict({"optim": {"lr": 1e-3}, "estimator": {"name": "reinforce", "inner_epochs": 2}})
    assert a == b and a.optim.lr == 1e-3 and a.estimator.name == "reinforce"


def test_old_flat_configs_still_load():
    """config.yaml of the previous (flat) TransferConfig/AlignConfig: renamed keys are aliases."""
    t = TransferConfig.from_dict({"bank_guidance": 2.0, "grad_clip": 0.5, "checkpoint_every": 7, "lam": 0.3})
    assert (t.bank.guidance_scale, t.optim.max_grad_norm, t.run.save_every, t.diff_tuning.lam) == (2.0, 0.5, 7, 0.3)
    a = AlignConfig.from_dict({"prompts": ["a cat"], "labels": None, "extra": {}})
    assert a.chain.prompts == ["a cat"]


@pytest.mark.parametrize("values,needle", [
    ({"steps": "ten"}, "option steps must be an integer, got 'ten'"),
    ({"steps": 0}, "option steps must be >= 1, got 0"),
    ({"eta": float("nan")}, "option eta must be a number"),
    ({"tensorboard": 3}, "option tensorboard must be true or false"),
    ({"lr_schedule": "cosin"}, "did you mean 'cosine'"),
    ({"stepz": 3}, "unknown align option 'stepz' (did you mean 'steps'?)"),
    ({"optim": {"lrr": 1}}, "did you mean 'lr'"),
    ({"clip_range": -1.0}, "option clip_range must be > 0"),
])
def test_bad_values_get_one_clear_message(values, needle):
    with pytest.raises(ChaintuneError) as e:
        AlignConfig.from_dict(values)
    assert needle in str(e.value)


def test_config_built_in_python_is_checked_too():
    cfg = AlignConfig()
    cfg.optim.batch_size = -1
    with pytest.raises(ChaintuneError, match="batch_size must be >= 1"):
        cfg.validate()


def test_numeric_strings_from_yaml_are_numbers():
    # YAML 1.1 reads `1e-4` as a string; a config file must still mean the number
    cfg = AlignConfig.from_dict(yaml.safe_load("lr: 1e-4\nsteps: 1e2\n") | {"steps": 100})
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)


@dataclasses.dataclass
class _A:
    lr: float = option(1.0, "x")


@dataclasses.dataclass
class _B:
    lr: float = option(2.0, "y")


@dataclasses.dataclass
class _Clash:
    a: _A = section(_A)
    b: _B = section(_B)


def test_repeated_option_names_are_a_declaration_error():
    with pytest.raises(TypeError, match="unique"):
        specs(_Clash())


def test_estimator_reads_only_its_own_options():
    from chaintune.align import estimator_from_config

    est = estimator_from_config(AlignConfig.from_dict({"estimator": "zeroth-order", "sigma": 0.01,
                                                       "shared_perturbation": True}))
    assert (est.sigma, est.shared) == (0.01, True)
    with pytest.warns(UserWarning, match="does not use h"):
        estimator_from_config(AlignConfig.from_dict({"estimator": "reinforce", "h": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defaults of options it does not take are not worth a warning
        estimator_from_config(AlignConfig.from_dict({"estimator": "reinforce"}))
    with pytest.raises(ChaintuneError, match="j must be"):
        estimator_from_config(AlignConfig.from_dict({"j": "20,10"}))


def test_refl_default_range_follows_the_chain_length(tiny_unet_model):
    """ReFL's default stop range is the last quarter of *this* chain (it assumed 50 steps before)."""
    import chaintune
    from chaintune.adapters import apply_lora
    from chaintune.align import estimator_from_config
    from chaintune.rewards import FunctionReward

    est = estimator_from_config(AlignConfig.from_dict({"estimator": "refl"}))
    m = __import__("copy").deepcopy(tiny_unet_model)
    apply_lora(m.denoiser, rank=2)
    bright = FunctionReward(lambda images: images.mean(dim=(1, 2, 3)), differentiable=True, name="bright")
    grads = chaintune.estimate_gradient(m, bright, est, n=2, steps=8, generator=torch.Generator().manual_seed(0))
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
