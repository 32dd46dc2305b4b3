"""How a setting is declared: once, as a dataclass field, with its checker and one line of doc.

``setting(default, check, doc)`` makes the field; from it come the TOML key (the field's
name), the ``LRNSERVE_*`` variable, the ``serve`` flag, the validation (``check`` raises a
``ConfigError`` naming the key, variable or flag it was given under) and the generated
reference table (``docs/settings.md``). Checkers describe what they accept, for that table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "LRNSERVE_"


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key or variable at fault."""


class Check:
    """Turns a raw value (TOML value, or a string from a variable or flag) into a typed one."""

    text = ""  # what is accepted, for the reference table

    def __call__(self, key: str, value: object) -> Any:
        raise NotImplementedError


class Integer(Check):
    def __init__(self, minimum: int, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.text = f"integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")

    def __call__(self, key: str, value: object) -> int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise ConfigError(f"{key}: expected an {self.text}, got {value}")
        return value


class Number(Check):
    def __init__(self, minimum: float) -> None:
        self.minimum = minimum
        self.text = f"number >= {minimum:g}"

    def __call__(self, key: str, value: object) -> float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value < self.minimum:
            raise ConfigError(f"{key}: expected a number >= {self.minimum}, got {value}")
        return float(value)


class Choice(Check):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.text = " | ".join(choices)

    def __call__(self, key: str, value: object) -> str:
        if not isinstance(value, str) or value.lower() not in self.choices:
            raise ConfigError(f"{key}: expected one of {', '.join(self.choices)}, got {value!r}")
        return value.lower()


class Text(Check):
    text = "string"

    def __call__(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        return value.strip()


class Boolean(Check):
    text = "true | false"
    TRUE = ("1", "true", "yes", "on")
    FALSE = ("0", "false", "no", "off")

    def __call__(self, key: str, value: object) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in self.TRUE + self.FALSE:
            return value.strip().lower() in self.TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")


class Device(Check):
    text = "auto | cpu | cuda | cuda:N"

    def __call__(self, key: str, value: object) -> str:
        text = Text()(key, value).lower()
        if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
            return text
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {value!r}")


class File(Check):
    """An existing file; a relative path in a config file is relative to that file's folder."""

    text = "path of an existing file"

    def __call__(self, key: str, value: object, base: Path | None = None) -> Path:
        path = Path(Text()(key, value))
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise ConfigError(f"{key}: file {path} does not exist")
        return path


class FileOrNumbers(File):
    """An existing file (as ``File``), or a non-empty list of numbers (a Caffe mean: file or values)."""

    text = "path of an existing file, or a list of numbers"

    def __call__(self, key: str, value: object, base: Path | None = None) -> Path | tuple[float, ...]:  # type: ignore[override]
        if not isinstance(value, list):
            return super().__call__(key, value, base)
        if not value:
            raise ConfigError(f"{key}: expected a file or a non-empty list of numbers, got []")
        number = Number(-math.inf)
        return tuple(number(f"{key}[{i}]", v) for i, v in enumerate(value))


class Directory(Check):
    """An existing folder (relative to a config file's folder when given in one)."""

    text = "path of an existing folder"

    def __call__(self, key: str, value: object, base: Path | None = None) -> Path:
        path = Path(Text()(key, value))
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_dir():
            raise ConfigError(f"{key}: folder {path} does not exist")
        return path


class Names(Check):
    """A list of names: a TOML list, repeated flags, or one comma-separated string."""

    text = "names (a list; comma-separated in a variable)"

    def __call__(self, key: str, value: object) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of names, got {value!r}")
        names = []
        for item in items:
            parts = item.split(",") if isinstance(item, str) else [item]
            for part in parts:
                if not isinstance(part, str) or not part.strip():
                    raise ConfigError(f"{key}: expected non-empty names, got {value!r}")
                names.append(part.strip())
        return tuple(names)


@dataclass(frozen=True)
class Setting:
    """One declared setting: where it may be given and how it is checked and documented."""

    name: str
    default: Any
    check: Check
    doc: str
    toml: bool = True
    env: bool = True
    flags: tuple[str, ...] | None = None  # None: --NAME-WITH-DASHES; () for none
    flag_sets: object = None  # a flag that takes no value sets this (booleans)
    only: str | None = None  # model settings: the group of model kinds it applies to (settings.MODEL_GROUPS)

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag_names(self) -> tuple[str, ...]:
        return self.flags if self.flags is not None else ("--" + self.name.replace("_", "-"),)


SETTING = "lrnserve.setting"


def setting(default: Any, check: Check, doc: str, **where: Any) -> Any:
    """A dataclass field declaring one setting (see ``Setting`` for ``where``)."""
    declared = {"default": default, "check": check, "doc": doc, **where}
    if default is dataclasses.MISSING:  # required: the loader always gives it
        return dataclasses.field(metadata={SETTING: declared})
    return dataclasses.field(default=default, metadata={SETTING: declared})


def model_setting(default: Any, check: Check, doc: str, only: str | None = None) -> Any:
    """A setting of one ``[models.NAME]`` table: a TOML key only (``only``: a group of model kinds)."""
    return setting(default, check, doc, env=False, flags=(), only=only)


def settings_of(cls: type) -> dict[str, Setting]:
    """The settings declared on a dataclass, by name, in declaration order."""
    return {
        f.name: Setting(name=f.name, **f.metadata[SETTING]) for f in dataclasses.fields(cls) if SETTING in f.metadata
    }
