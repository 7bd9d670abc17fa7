"""The CLI's error policy: input errors are one ``error:`` line and exit 2; a bug in chaintune says so in one
line, exits 1 and leaves the traceback in a crash file; Ctrl-C is ``interrupted`` and 130."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chaintune.cli import main as cli
from chaintune.errors import ChaintuneError


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def lines_of(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def assert_input_error(code: int, err: str, *needles: str) -> str:
    lines = lines_of(err)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def command(monkeypatch, tmp_path):
    """Register a throwaway command ``boom`` whose body is the given function (removed afterwards)."""
    monkeypatch.setattr(cli.app, "registered_commands", list(cli.app.registered_commands))
    monkeypatch.setenv("CHAINTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CHAINTUNE_DEBUG", raising=False)

    def register(body):
        cli.app.command("boom")(body)

    return register


@pytest.mark.parametrize("args,needles", [
    (["sample", "--nmu", "3"], ["No such option: --nmu", "--num"]),
    (["sample", "--num"], ["--num", "requires an argument"]),
    (["smaple"], ["No such command 'smaple'", "sample"]),
    (["sample", "--num", "many"], ["--num"]),
    (["report"], ["Missing argument"]),
], ids=["unknown-option", "missing-value", "mistyped-command", "bad-value", "missing-argument"])
def test_usage_errors_are_one_line_exit_2(capsys, args, needles):
    code, _, err = run_cli(capsys, *args)
    assert_input_error(code, err, *needles)


def test_usage_error_through_the_entry_point():
    p = subprocess.run([sys.executable, "-m", "chaintune.cli.main", "smaple"], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).parent)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert lines_of(p.stderr) == [ln for ln in lines_of(p.stderr) if ln.startswith("error: ")]
    assert "Did you mean 'sample'" in p.stderr


def test_internal_error_is_a_bug_line_with_a_crash_file(capsys, command, tmp_path):
    def boom():
        return len(None)  # a TypeError: a bug, not the user's input

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    lines = lines_of(err)
    assert code == 1
    assert "Traceback" not in err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("chaintune: internal error (a bug in chaintune, not your input): TypeError:"), line
    assert "please report it" in line
    path = Path(line.split("full traceback in ")[1].split(" — ")[0])
    assert path.parent == tmp_path / "cache" / "logs"
    assert path.name.startswith("crash-") and path.suffix == ".txt"
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "len(None)" in text and "TypeError" in text
    assert "command: chaintune boom" in text


def test_crash_file_falls_back_to_the_temp_dir(capsys, command, tmp_path, monkeypatch):
    import tempfile

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CHAINTUNE_CACHE", str(blocker))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def boom():
        raise RuntimeError("something inside chaintune broke")

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    assert code == 1
    crash = list((tmp_path / "tmp").glob("crash-*.txt"))
    assert len(crash) == 1 and str(crash[0]) in err
    assert "something inside chaintune broke" in crash[0].read_text()


def test_debug_reraises(command, monkeypatch):
    def boom():
        raise TypeError("the real traceback")

    command(boom)
    monkeypatch.setenv("CHAINTUNE_DEBUG", "1")
    with pytest.raises(TypeError, match="the real traceback"):
        cli.main(["boom"])


@pytest.mark.parametrize("err_no,needle", [(errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied"),
                                           (errno.EROFS, "Read-only")])
def test_disk_full_and_permission_errors_are_input_errors(capsys, command, err_no, needle):
    import os

    def boom():
        raise OSError(err_no, os.strerror(err_no), "/data/out/grid.png")

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    assert_input_error(code, err, needle, "/data/out/grid.png")


def test_disk_full_behind_another_exception(capsys, command):
    def boom():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("could not write the checkpoint") from e

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    assert_input_error(code, err, "No space left")


def test_other_oserrors_are_bugs(capsys, command):
    def boom():
        raise OSError(errno.EIO, "Input/output error")

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    assert code == 1 and "internal error" in err


def test_chaintune_error_and_model_not_found(capsys, command):
    def boom():
        raise ChaintuneError("no such\nthing")  # a multi-line message still prints as one line

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    assert_input_error(code, err, "no such thing")

    from chaintune.backends import ModelNotFoundError as not_found

    cli.app.registered_commands.pop()

    def boom2():
        raise not_found("unknown model 'x'")

    command(boom2)
    code, _, err = run_cli(capsys, "boom")
    assert_input_error(code, err, "unknown model 'x'")


def test_keyboard_interrupt(capsys, command):
    def boom():
        raise KeyboardInterrupt

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    assert code == 130
    assert lines_of(err) == ["interrupted"]


def test_chaintune_error_is_a_value_error():
    assert issubclass(ChaintuneError, ValueError)
    from chaintune.errors import InputFileNotFoundError

    assert issubclass(InputFileNotFoundError, FileNotFoundError) and issubclass(InputFileNotFoundError, ValueError)


def test_error_in_a_users_reward_names_it_and_the_type(capsys, command, tmp_path, monkeypatch):
    (tmp_path / "cli_error_rewards.py").write_text(textwrap.dedent("""
        def score(images):
            return {}["missing"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    def boom():
        import torch

        from chaintune.rewards import get_reward

        get_reward("cli_error_rewards:score")(torch.zeros(2, 1, 8, 8))

    command(boom)
    code, _, err = run_cli(capsys, "boom")
    line = assert_input_error(code, err, "your reward 'cli_error_rewards:score'", "KeyError", "'missing'")
    assert line != "error: 'missing'"


def test_error_in_a_users_reward_subclass():
    import torch

    from chaintune.rewards.base import Reward

    class Mine(Reward):
        name = "mine"

        def forward(self, images, prompts, labels, metadata):
            raise IndexError("off by one")

    Mine.__module__ = "user_code"
    with pytest.raises(ChaintuneError, match="your reward 'mine'.*IndexError: off by one"):
        Mine()(torch.zeros(2, 1, 8, 8))


def test_bad_config_and_prompt_files_are_input_errors(tmp_path):
    from chaintune.prompts import load_prompts
    from chaintune.utils.io import load_config_file

    (tmp_path / "c.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ChaintuneError, match="not valid YAML"):
        load_config_file(tmp_path / "c.yaml")
    (tmp_path / "c.toml").write_text("lr = = 1\n")
    with pytest.raises(ChaintuneError, match="not valid TOML"):
        load_config_file(tmp_path / "c.toml")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config_file(tmp_path / "none.yaml")
    (tmp_path / "p.json").write_text('[{"text": "a cat"}]')
    with pytest.raises(ChaintuneError, match="'prompt' key"):
        load_prompts(tmp_path / "p.json")
    (tmp_path / "q.json").write_text('["a cat",')
    with pytest.raises(ChaintuneError, match="not valid JSON"):
        load_prompts(tmp_path / "q.json")


def test_sample_rejects_bad_numbers_before_loading(capsys):
    code, _, err = run_cli(capsys, "sample", "--num", "0")
    assert_input_error(code, err, "--num must be >= 1")
    code, _, err = run_cli(capsys, "sample", "--scheduler", "dpm")
    assert_input_error(code, err, "unknown scheduler 'dpm'")
