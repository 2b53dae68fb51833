"""How a setting is declared, found and parsed: the machinery behind every config section.

A section is a frozen msgspec Struct; each field is one setting, annotated with `setting(...)`,
which carries its help text, environment variables and constraints in one `msgspec.Meta`. The
command line, the environment, the settings table and validation are all read from there.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def setting(help: str, *, env: tuple[str, ...] = (), metavar: str | None = None,
            flag: str | None = None, rule: str | None = None, ge: int | float | None = None,
            gt: int | float | None = None, le: int | float | None = None,
            pattern: str | None = None) -> msgspec.Meta:
    """One setting's metadata. `flag` names it on the command line when the field's own name
    would repeat its section's (`--zmq`, not `--zmq-connect`); `rule` ends the error message
    about an invalid value ("must be positive"; derived from the constraints when not given)."""
    if rule is None:
        if ge is not None and le is not None:
            rule = f"must be from {ge} to {le}"
        elif ge is not None:
            rule = f"must be at least {ge}"
        elif gt is not None:
            rule = "must be positive" if gt == 0 else f"must be more than {gt}"
        elif pattern is not None:
            rule = f"must match {pattern}"
    constraints = {"ge": ge, "gt": gt, "le": le, "pattern": pattern}
    kwargs: dict[str, Any] = {k: v for k, v in constraints.items() if v is not None}
    return msgspec.Meta(**kwargs, description=help,
                        extra={"env": env, "metavar": metavar, "flag": flag, "rule": rule})


class Setting(NamedTuple):
    """One setting as the command line, the environment and the docs see it."""

    section: str  # the Config field holding its section
    field: str  # the field in the section
    key: str  # the flag's name with underscores: `--zmq-bind` is zmq_bind
    annotation: Any  # the field's type with its constraints
    default: Any
    help: str
    env: tuple[str, ...]  # Dynamo's variables also read, after KVRELAY_<KEY>
    metavar: str | None
    rule: str | None
    many: bool  # a tuple of strings: repeatable, comma-separated in the environment
    choices: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env_vars(self) -> tuple[str, ...]:
        return (env_var(self.key), *self.env)

    def parse(self, raw: Any, origin: str) -> Any:
        """A flag's or variable's value as the field's type, checked against its rules."""
        if self.many:
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            return tuple(str(i).strip() for i in items if str(i).strip())
        if self.choices and str(raw) not in self.choices:
            raise ConfigError(f"{origin}: {raw!r} is not one of {', '.join(self.choices)}")
        bare = _strip(self.annotation)
        try:
            value = msgspec.convert(raw, bare, strict=False)
        except msgspec.ValidationError:
            kinds = set(typing.get_args(bare)) | {bare}
            kind = "int" if int in kinds else "float" if float in kinds else "value"
            raise ConfigError(f"{origin}: {raw!r} is not a valid {kind}") from None
        self.check(value, origin)
        return value

    def check(self, value: Any, origin: str | None = None) -> None:
        """Raise ConfigError when `value` breaks this setting's constraints."""
        try:
            msgspec.convert(value, self.annotation)
        except msgspec.ValidationError:
            raise ConfigError(f"{origin or self.flag} {self.rule} (got {value!r})") from None


def _strip(annotation: Any) -> Any:
    """The type without its constraints: `Annotated[int, ...] | None` is `int | None`."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _strip(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return functools.reduce(operator.or_, (_strip(a) for a in typing.get_args(annotation)))
    return annotation


def env_var(key: str) -> str:
    return "KVRELAY_" + key.upper()


def section_settings(section: str, struct: type[msgspec.Struct]) -> Iterator[Setting]:
    """The settings of one section, in declaration order."""
    hints = typing.get_type_hints(struct, include_extras=True)
    for info in msgspec.structs.fields(struct):
        annotation = hints[info.name]
        meta = next(m for m in typing.get_args(annotation)[1:] if isinstance(m, msgspec.Meta))
        extra = meta.extra or {}
        bare = _strip(annotation)
        choices = typing.get_args(bare) if typing.get_origin(bare) is typing.Literal else ()
        yield Setting(
            section=section, field=info.name, key=extra.get("flag") or info.name,
            annotation=annotation, default=info.default, help=meta.description or "",
            env=extra["env"], metavar=extra["metavar"], rule=extra["rule"],
            many=typing.get_origin(bare) is tuple, choices=tuple(str(c) for c in choices))
