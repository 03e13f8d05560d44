"""Command-line flags derived from a settings dataclass, so a setting's name, default and help have one home.

Every command's `--base` flags are `models.BaseSpec`'s fields (`add_config_arguments(parser, BaseSpec)`, then
`config_from_args(BaseSpec, args)`); `train` adds `TrainConfig`'s, `toyworld pretrain` `PretrainConfig`'s.

A field becomes a flag when it has help: in its `field(metadata=...)`, or in a table given for a dataclass whose
module does not carry it. The keys:

- `help`: what the setting does, as plain text (a `%` is a percent sign);
- `group`: the argument group that lists it (none: the command's own options);
- `flag`: its name when not `--field-name` (a switch whose field defaults to true: `--no-field-name`; with
  `given_only`, where defaults may come from elsewhere, each switch also gets its opposite, `--field-name`);
- `positional`: true for an argument without a flag; `metavar`: its placeholder in the usage line;
- `choices`: the values a flag takes (argparse refuses others while parsing);
- `default_help`: what `(default: ...)` says where the value does not say it (`None`, a switch, a list).

The annotation gives the parsing: `bool` a switch, a `Sequence` a repeatable flag, `int`, `float` and `Path` their
type, `int | str` a number or a word (`--band auto`); anything else stays text. A field without a default is
required. Only parsing happens here: the dataclass's own checks refuse bad values, with the same words for every
caller.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

Spec = Mapping[str, Any]
T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, config: type, table: Mapping[str, Spec] | None = None,
                         *, given_only: bool = False) -> None:
    """Add a flag for every field of the dataclass `config` that has help (from `table` where given). With
    `given_only`, a flag left out leaves no attribute, so `config_from_args` can tell it from one given (the help
    still shows the field's default)."""
    hints = typing.get_type_hints(config)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field, spec in _flag_fields(config, table):
        group = spec.get("group")
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(group)
        target = parser if group is None else groups[group]
        parse = _parser_of(hints[field.name])
        helped = _help(spec, field.default, parse)
        name = spec.get("flag", f"--{field.name.replace('_', '-')}")
        unset = {"default": argparse.SUPPRESS} if given_only else {}
        if spec.get("positional"):
            target.add_argument(field.name, type=parse, metavar=spec.get("metavar"), help=helped)
        elif parse is bool:
            off = field.default is True
            name = spec.get("flag", f"--no-{field.name.replace('_', '-')}" if off else name)
            target.add_argument(name, dest=field.name, action="store_false" if off else "store_true", help=helped,
                                **unset)
            if given_only:  # defaults from elsewhere may set the switch either way: its opposite undoes them
                opposite = f"--{name[5:]}" if name.startswith("--no-") else f"--no-{name[2:]}"
                target.add_argument(opposite, dest=field.name, action="store_true" if off else "store_false",
                                    help=f"the opposite of {name}", **unset)
        elif parse is list:
            target.add_argument(name, dest=field.name, action="append", metavar=spec.get("metavar"), help=helped,
                                **(unset or {"default": []}))
        else:
            required = field.default is dataclasses.MISSING
            target.add_argument(name, dest=field.name, type=parse, required=required, metavar=spec.get("metavar"),
                                choices=spec.get("choices"), help=helped,
                                **(unset or {"default": None if required else field.default}))


def config_from_args(config: type[T], args: argparse.Namespace, table: Mapping[str, Spec] | None = None, *,
                     defaults: Mapping[str, Any] | None = None, **given: Any) -> T:
    """The dataclass from the flags `add_config_arguments` added, plus `given` fields (flags added elsewhere). A
    flag left out (`given_only`) takes its value from `defaults`, else the field's own default."""
    values = {**(defaults or {})}
    values.update({field.name: getattr(args, field.name) for field, _ in _flag_fields(config, table)
                   if hasattr(args, field.name)})
    return config(**values, **given)


def _flag_fields(config: type, table: Mapping[str, Spec] | None) -> Iterator[tuple[dataclasses.Field, Spec]]:
    fields = dataclasses.fields(config)
    if table is not None and not set(table) <= {field.name for field in fields}:
        raise ValueError(f"not fields of {config.__name__}: {sorted(set(table) - {f.name for f in fields})}")
    for field in fields:
        spec = field.metadata if table is None else table.get(field.name, {})
        if "help" in spec:
            yield field, spec


def _parser_of(hint: Any) -> Callable[[str], Any] | None:
    """`bool` (a switch), `list` (repeatable) or the function that reads the flag's text (None: the text)."""
    if typing.get_origin(hint) in (collections.abc.Sequence, list, tuple):
        return list
    kinds = set(typing.get_args(hint) or (hint,)) - {type(None)}
    if kinds == {bool}:
        return bool
    if kinds >= {int, str}:
        return _number_or_word
    return next((kind for kind in (int, float, Path) if kind in kinds and str not in kinds), None)


def _number_or_word(text: str) -> int | str:
    """`3` -> 3, `auto` -> "auto": the dataclass's check says which words it takes."""
    try:
        return int(text)
    except ValueError:
        return text


def _help(spec: Spec, default: Any, parse: Callable[[str], Any] | None) -> str:
    shown = spec.get("default_help")
    if shown is None and parse not in (bool, list) and default not in (None, dataclasses.MISSING):
        shown = f"{default:g}" if isinstance(default, float) else default
    text = spec["help"] if shown is None else f"{spec['help']} (default: {shown})".lstrip()
    return text.replace("%", "%%")
