"""Every option defined once: config dataclasses whose field metadata carries the help text.

A trainer's config is a dataclass of *sections* (model and chain, estimator, optimisation,
guards, evaluation, run), each a dataclass of options declared with :func:`option`. From these
declarations alone come the CLI flags and ``--help`` (``chaintune.cli.options``), the keys a
config file may use (flat, ``lr: 1e-4``, or nested, ``optim: {lr: 1e-4}``), type/choice/range
validation with one clear message, and the saved ``config.yaml``. Adding an option is one
:func:`option` line in its section (and the code that reads it).

Torch-free on purpose: ``chaintune --help`` imports this and nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from typing import Any

from chaintune.errors import ChaintuneError, shown, unknown_name

__all__ = ["option", "section", "field_help", "Spec", "specs", "from_dict", "to_dict", "check", "flat_values",
           "load_config"]


def option(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           choices: tuple | None = None, min: float | None = None, gt: float | None = None,
           max: float | None = None, flags: tuple[str, ...] = (), key: str | None = None,
           resumable: bool = False, parse: Callable[[Any], Any] | None = None, used_by: tuple[str, ...] = ()) -> Any:
    """A config field. ``key`` renames its flat name (flag ``--key``, config key ``key``); ``flags``
    adds flag spellings (``--lambda``); ``min``/``gt``/``max`` bound numbers; ``choices`` restricts.
    ``resumable``: ``--resume`` may change it (how long to train, how to evaluate, log and checkpoint); any
    other change would make the resumed run another experiment than its checkpoints', so it is refused.
    ``parse``: checks the value's form (raising ChaintuneError); the option keeps the value as given.
    ``used_by``: the variants that read it (an estimator option names its estimators: they take their option list
    from these declarations, and ``--help`` shows them in place of the section)."""
    meta = {"help": help, "choices": choices, "min": min, "gt": gt, "max": max, "flags": flags, "key": key,
            "resumable": resumable, "parse": parse, "used_by": tuple(used_by)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, *, prefix: str = "", **defaults: Any) -> Any:
    """A nested section of options; ``defaults`` override the section's own (a trainer's defaults).
    ``prefix`` is prepended to the flat names of the section's options (``bank_`` -> ``--bank-size``)."""
    return field(default_factory=lambda: cls(**defaults), metadata={"section": True, "prefix": prefix})


@dataclass
class Spec:
    """One option as seen from outside: its flat name, where it lives, its type, default and help."""

    name: str
    path: tuple[str, ...]
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    gt: float | None = None
    max: float | None = None
    flags: tuple[str, ...] = ()
    resumable: bool = False
    parse: Callable[[Any], Any] | None = None
    used_by: tuple[str, ...] = ()

    @property
    def section(self) -> str:
        return self.path[0] if len(self.path) > 1 else ""


def field_help(cls: type, name: str) -> str:
    """The help text of option ``name`` of config ``cls`` (for hand-written commands that share it)."""
    return cls.__dataclass_fields__[name].metadata["help"]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def specs(config: Any, _path: tuple[str, ...] = (), _prefix: str = "") -> list[Spec]:
    """The flattened options of a config instance (defaults are the instance's values)."""
    out: list[Spec] = []
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("section"):
            out += specs(value, (*_path, f.name), _prefix + f.metadata.get("prefix", ""))
            continue
        m = f.metadata
        out.append(Spec(name=_prefix + (m.get("key") or f.name), path=(*_path, f.name), type=hints[f.name],
                        default=value, help=m.get("help", ""), choices=m.get("choices"), min=m.get("min"),
                        gt=m.get("gt"), max=m.get("max"), flags=tuple(m.get("flags") or ()),
                        resumable=bool(m.get("resumable")), parse=m.get("parse"),
                        used_by=tuple(m.get("used_by") or ())))
    if not _path:
        names = [s.name for s in out]
        dup = {n for n in names if names.count(n) > 1}
        if dup:  # a programming error in a config declaration, not user input
            raise TypeError(f"{type(config).__name__}: option names must be unique, repeated: {sorted(dup)}")
    return out


def _sections(config: Any) -> dict[str, str]:
    """Section attribute name -> its flat-name prefix (for nested config-file keys)."""
    return {f.name: f.metadata.get("prefix", "") for f in dataclasses.fields(config) if f.metadata.get("section")}


# ------------------------------------------------------------------------------------- coercion


def _args(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _kind(v: Any) -> str:
    return f"{shown(v)} ({type(v).__name__})"


INT64 = (-(2**63), 2**63 - 1)
"""The range of an integer option: torch and numpy take integers (seeds, counts, sizes) as 64-bit, and a
larger one fails deep inside them (``torch.Generator().manual_seed(2**64)``: "Overflow when unpacking long")."""


def coerce(spec: Spec, value: Any) -> Any:
    """``value`` converted to the option's type, or one clear ChaintuneError. Config files give
    strings for things like ``1e-4`` (YAML 1.1), so numeric strings are accepted; booleans are
    never numbers, and floats must be finite."""
    alts = _args(spec.type)
    if value is None:
        if type(None) in alts:
            return None
        raise ChaintuneError(f"option {spec.name} needs a value (got null)")
    errors = []
    for tp in alts:
        if tp is type(None):
            continue
        try:
            v = _coerce_one(tp, value)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
            continue
        _check_bounds(spec, v)
        if spec.parse is not None:
            spec.parse(v)
        return v
    want = " or ".join(_type_name(t) for t in alts if t is not type(None))
    raise ChaintuneError(f"option {spec.name} must be {want}, got {_kind(value)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(tp, str(tp))


def _coerce_one(tp: Any, v: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise TypeError("not a list")
        return [_coerce_one(inner, x) for x in v]
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return v.lower() in ("true", "yes", "on", "1")
        raise TypeError("not a bool")
    if tp is int:
        if isinstance(v, bool):
            raise TypeError("bool is not an int")
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            return int(v.strip())
        raise TypeError("not an int")
    if tp is float:
        if isinstance(v, bool):
            raise TypeError("bool is not a number")
        x = float(v) if isinstance(v, (int, float, str)) else None
        if x is None:
            raise TypeError("not a number")
        if not math.isfinite(x):
            raise ValueError("not finite")
        return x
    if tp is str:
        if isinstance(v, str):
            return v
        raise TypeError("not a string")
    if tp is dict:
        if isinstance(v, dict):
            return dict(v)
        raise TypeError("not a mapping")
    return v


def _check_bounds(spec: Spec, v: Any) -> None:
    if spec.choices is not None and v not in spec.choices:
        raise unknown_name(f"value for {spec.name}", str(v), [str(c) for c in spec.choices])
    if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
        raise ChaintuneError(f"option {spec.name} must fit in 64 bits (at most {INT64[1]}), got {shown(v)}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if spec.min is not None and v < spec.min:
            raise ChaintuneError(f"option {spec.name} must be >= {spec.min}, got {v}")
        if spec.gt is not None and v <= spec.gt:
            raise ChaintuneError(f"option {spec.name} must be > {spec.gt}, got {v}")
        if spec.max is not None and v > spec.max:
            raise ChaintuneError(f"option {spec.name} must be <= {spec.max}, got {v}")


# ------------------------------------------------------------------------------------ configs


def _set(config: Any, path: tuple[str, ...], value: Any) -> None:
    obj = config
    for p in path[:-1]:
        obj = getattr(obj, p)
    setattr(obj, path[-1], value)


def _get(config: Any, path: tuple[str, ...]) -> Any:
    obj = config
    for p in path:
        obj = getattr(obj, p)
    return obj


def flatten_keys(config: Any, values: dict, what: str) -> dict[str, Any]:
    """Flat option names from flat or nested (``section: {option: value}``) keys, aliases resolved.

    Inside a section a key may be the field's attribute name (as ``config.yaml`` writes it) or its
    flat name. ``ALIASES`` on the config class maps old names to new ones (None: ignored)."""
    secs = _sections(config)
    by_path = {s.path: s.name for s in specs(config)}
    aliases: dict[str, str | None] = getattr(type(config), "ALIASES", {})
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if not isinstance(k, str):
            raise ChaintuneError(f"{what} keys must be names, got {shown(k)}")
        if k in secs and isinstance(v, dict):
            for k2, v2 in v.items():
                flat[by_path.get((k, str(k2)), secs[k] + str(k2))] = v2
        elif aliases.get(k, k) is not None:
            flat[aliases.get(k, k)] = v
    return flat


def from_dict(cls: type, values: dict, what: str = "option") -> Any:
    """A config of type ``cls`` from a flat or nested mapping; unknown keys get a did-you-mean."""
    if not isinstance(values, dict):
        raise ChaintuneError(f"{what}s must be a mapping of name: value, got {type(values).__name__}")
    config = cls()
    by_name = {s.name: s for s in specs(config)}
    for name, value in flatten_keys(config, values, what).items():
        if name not in by_name:
            raise unknown_name(what, name, by_name)
        spec = by_name[name]
        _set(config, spec.path, coerce(spec, value))
    return config


def check(config: Any) -> None:
    """Validate every option's type, choices and bounds (a config built in Python skips from_dict)."""
    for spec in specs(config):
        _set(config, spec.path, coerce(spec, _get(config, spec.path)))


def to_dict(config: Any) -> dict:
    """The nested mapping written as ``config.yaml`` (loads back with :func:`from_dict`)."""
    return dataclasses.asdict(config)


def flat_values(config: Any) -> dict[str, Any]:
    """``{flat option name: value}``."""
    return {s.name: s.default for s in specs(config)}


def iter_sections(config: Any) -> Iterator[tuple[str, list[Spec]]]:
    """Options grouped by section, in declaration order (for ``--help`` panels and docs)."""
    groups: dict[str, list[Spec]] = {}
    for s in specs(config):
        groups.setdefault(s.section, []).append(s)
    yield from groups.items()


def load_config(path: str, cls: type, what: str) -> Any:
    """A config file (YAML or TOML, flat or nested keys) as a ``cls``."""
    from chaintune.utils.io import load_config_file

    return from_dict(cls, load_config_file(path), what)
