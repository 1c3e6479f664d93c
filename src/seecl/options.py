"""Command-line options generated from the config dataclasses, so a setting is declared once.

`add_options(parser, Cls, "section.")` adds one `--field-name` option per field of a config
dataclass, with the field's doc as its help line and its default shown; `overrides(args)` turns the
options a user gave into `section.field=value` overrides, which `config.load_config` applies after
the YAML file and validates like any other override. Lists take comma-separated values. Sections
that hold whole dataclasses (the run config) stay `section.field=value` arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Literal

_DEST = "option:"


def add_options(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = (), flag_prefix: str = ""
) -> None:
    """One `--{flag_prefix}field-name` option per field of `cls`, overriding `{prefix}field`."""
    hints = typing.get_type_hints(cls)
    instance_defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    group = parser.add_argument_group(f"{prefix.rstrip('.') or cls.__name__} settings")
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if field.name in skip or dataclasses.is_dataclass(annotation) or typing.get_origin(annotation) is dict:
            continue
        flag = "--" + flag_prefix + field.name.replace("_", "-")
        text = field.metadata.get("doc", "")
        default = instance_defaults[field.name]
        shown = "" if default is None or default == [] else f" (default: {_show(default)})"
        help_text = (text + shown).replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": f"{_DEST}{prefix}{field.name}", "default": None, "help": help_text}
        choices = _choices(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs["choices"] = choices
        else:
            kwargs["metavar"] = _metavar(annotation)
            # typed here, so the override carries a number as a number and text as text
            kwargs["type"] = _comma_list if typing.get_origin(annotation) is list else _scalar_type(annotation)
        group.add_argument(flag, **kwargs)


def overrides(args: argparse.Namespace, prefix: str = "") -> list[str]:
    """The options for `prefix`-ed fields given on the command line, as `field=value` overrides
    (the prefix removed)."""
    out = []
    for dest, value in vars(args).items():
        name = dest[len(_DEST) :]
        if not dest.startswith(_DEST) or value is None or not name.startswith(prefix) or "." in name[len(prefix) :]:
            continue
        out.append(f"{name[len(prefix) :]}={json.dumps(value)}")
    return out


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _scalar_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return base if base in (int, float) else str


def _metavar(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return "A,B,..."
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return {int: "N", float: "X", str: "TEXT"}.get(base, "VALUE")
