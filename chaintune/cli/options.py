"""Trainer commands generated from their config dataclasses: one flag per option, nothing repeated.

``config_command(app, "align", AlignConfig, run)`` registers ``chaintune align`` with a flag for
every option of :class:`AlignConfig` (name, type, default and help from the field's metadata),
plus ``--config FILE`` (YAML/TOML, flat or nested keys), ``--resume`` and ``--overwrite``.
Precedence: defaults < config file (or, with ``--resume``, the run's own ``config.yaml``) < flags
given on the command line. Torch-free: ``--help`` must not load a model library.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from chaintune.options import Spec, flatten_keys, from_dict, specs

_FIXED = ("ctx", "config", "resume", "overwrite", "trust_code")


def _cli_type(spec: Spec) -> Any:
    """The type typer parses a flag as: a list is a repeatable flag; a union of a scalar with a list (like
    ``str | list[int]``) is given as text and parsed by the config."""
    union = typing.get_origin(spec.type) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(spec.type) if a is not type(None)] if union else [spec.type]
    optional = union and len(args) < len(typing.get_args(spec.type))
    base = args[0] if len(args) == 1 else str
    return base | None if optional or spec.default is None else base


def _flags(spec: Spec) -> list[str]:
    name = "--" + spec.name.replace("_", "-")
    if _cli_type(spec) is bool:
        return [f"{name}/--no-{spec.name.replace('_', '-')}"]
    return [name, *spec.flags]


def _help(spec: Spec) -> str:
    where = f"[{spec.section}] " if spec.section else ""
    if spec.used_by:
        where = f"[{spec.section}: {', '.join(spec.used_by)}] "
    repeat = " (repeat the flag for several values)" if typing.get_origin(_cli_type(spec)) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(_cli_type(spec))) else ""
    return where + spec.help + repeat


RUN_OVERWRITE = ("Replace an existing run in --out (only a chaintune run directory that holds nothing else; never the "
                 "working directory).")


def config_command(app: typer.Typer, name: str, config_cls: type, run: Callable[..., None], *, help: str,
                   code_options: tuple[str, ...] = (), resumable: bool = True,
                   overwrite_help: str = RUN_OVERWRITE, precheck: Callable[[dict], None] | None = None) -> None:
    """Register ``chaintune NAME``: flags from ``config_cls``; ``run(cfg, resume=, overwrite=)`` does the work.

    ``code_options`` name options whose value may import and run Python code (``module:function``
    rewards): taken from a config file that belongs to a run directory (the config ``--resume`` reads, or any
    ``--config`` inside a run), they need ``--trust-code``. A command that writes no run (``sample``) is
    ``resumable=False`` (no ``--resume``) and says what its ``--overwrite`` replaces. ``precheck(values)`` sees the
    option values before they are converted (for messages that name a command's flags)."""
    defaults = config_cls()
    opts = specs(defaults)
    clash = {s.name for s in opts} & set(_FIXED)
    if clash:  # a declaration error, caught by the test that builds every command
        raise TypeError(f"{config_cls.__name__}: option names {sorted(clash)} are reserved by the CLI")
    params = [
        inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option(help="YAML/TOML file with any of these options (flat keys, or nested by "
                                      "section as config.yaml is written).")]),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option(help=overwrite_help)]),
    ]
    if resumable:
        resume = typer.Option(help="Continue the run in --out from its newest intact checkpoint, with its saved "
                              "config.yaml. Flags may change only steps and evaluation/logging/checkpoint settings; "
                              "a changed model, estimator, LR or schedule is refused.")
        params.insert(2, inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False,
                                           annotation=Annotated[bool, resume]))
    if code_options:
        trust = typer.Option(help="Allow a config from a run directory (the one --resume reads, or a --config inside a "
                             "run) to import and run Python code (a module:function reward). A run directory from "
                             "someone else can run any code.")
        params.append(inspect.Parameter("trust_code", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=Annotated[bool, trust]))
    for s in opts:
        default = list(s.default) if isinstance(s.default, list) else s.default
        params.append(inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[
            _cli_type(s), typer.Option(*_flags(s), help=_help(s), show_default=True)]))

    def command(**kwargs: Any) -> None:
        ctx: typer.Context = kwargs.pop("ctx")
        config, resume, overwrite = kwargs.pop("config"), kwargs.pop("resume", False), kwargs.pop("overwrite")
        trust = kwargs.pop("trust_code", False)
        source = config_source(kwargs.get("out"), config, resume)
        values = resolve(config_cls, ctx, kwargs, config, resume)
        if source is not None and not trust:
            owner = run_holding(source)
            if owner is not None:
                _refuse_saved_code(values, [k for k in code_options if not _on_command_line(ctx, k)], source, owner)
        if precheck is not None:
            precheck({**dataclasses.asdict(config_cls()), **values})
        run(from_dict(config_cls, values, f"{name} option"), resume=resume, overwrite=overwrite)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    command.__name__ = name
    app.command(name)(command)


def resolve(config_cls: type, ctx: typer.Context, given: dict, config: Path | None, resume: bool) -> dict:
    """Option values: the config file's (or a resumed run's config.yaml), then flags given on the command line."""
    from chaintune.utils.io import load_config_file

    defaults = config_cls()
    out = given.get("out")
    config = config_source(out, config, resume)
    values = flatten_keys(defaults, load_config_file(config), "config key") if config else {}
    if config:
        from_dict(config_cls, values, f"option in {config}")  # a typo in the file fails here, with its name
    for key, value in given.items():
        src = ctx.get_parameter_source(key)
        if src is not None and src.name == "COMMANDLINE":
            values[key] = value
    if out is not None:
        values["out"] = values.get("out", out) if not _on_command_line(ctx, "out") else out
    return values


def config_source(out: str | Path | None, config: Path | None, resume: bool) -> Path | None:
    """The config file the options come from: ``--config``, else with ``--resume`` the run's own config.yaml."""
    if config is None and resume and out is not None and (Path(out) / "config.yaml").exists():
        return Path(out) / "config.yaml"  # continue with the run's own settings
    return config


def run_holding(path: Path) -> Path | None:
    """The run directory ``path`` lies in (a folder holding chaintune's run marker, at any level above it), as
    given or once its links are resolved; None when it lies in none."""
    from chaintune.backends.run_dir import is_run_dir

    path = Path(path).absolute()
    for where in dict.fromkeys((path, path.resolve())):
        for folder in where.parents:
            if is_run_dir(folder):
                return folder
    return None


def _refuse_saved_code(values: dict, keys: list[str], source: Path, run: Path) -> None:
    """A config that belongs to a run directory may name code to import (the run may come from anyone): only
    with --trust-code. Options given on the command line are the user's own and are not checked."""
    from chaintune.errors import ChaintuneError, shown
    from chaintune.rewards.registry import code_terms

    for k in keys:
        v = values.get(k)
        found = code_terms(v) if isinstance(v, str) else []
        if found:
            raise ChaintuneError(f"{source} belongs to the run {run} and sets {k} to {shown(found[0])}, which imports "
                                 "and runs Python code; pass --trust-code if you trust this run directory")


def _on_command_line(ctx: typer.Context, key: str) -> bool:
    src = ctx.get_parameter_source(key)
    return src is not None and src.name == "COMMANDLINE"
