"""Click options generated from a settings class, so flags, env names and help never drift.

Each service's settings fields are the one statement of what can be configured: a field becomes
``--flag`` (the field name in kebab case, the service's own prefix dropped, or a name given for
compatibility), its help is the field's description followed by its environment variable and
default. Options default to "not given", so the environment applies unless a flag is passed.
Secret fields stay off the command line (a process list would show them); the command's help
names their variables instead.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

__all__ = ["env_name", "given", "option_fields", "settings_options"]

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound=BaseSettings)


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field reads."""
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def _inner(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` with ``None`` removed from a union."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def _is_secret(info: FieldInfo) -> bool:
    return _inner(info.annotation)[0] is SecretStr


def option_fields(cls: type[BaseSettings], exclude: tuple[str, ...] = ()) -> list[str]:
    """The fields of ``cls`` that become options: all but secrets and ``exclude``."""
    return [
        name
        for name, info in cls.model_fields.items()
        if name not in exclude and not _is_secret(info)
    ]


def _flag(field: str, strip: str) -> str:
    name = field.removeprefix(strip) if strip and field.startswith(strip) else field
    return "--" + name.replace("_", "-")


def _click_type(annotation: Any) -> Any:
    kind, _ = _inner(annotation)
    if get_origin(kind) is Literal:
        return click.Choice([str(v) for v in get_args(kind)])
    if kind is Path:
        return click.Path(path_type=Path)
    if kind in (int, float, str):
        return kind
    return str


def _help(cls: type[BaseSettings], field: str, info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    shown = "unset" if default is None else str(default)
    text = (info.description or "").rstrip()
    return f"{text} [env {env_name(cls, field)}; default {shown}]".strip()


def settings_options(
    cls: type[BaseSettings],
    *,
    strip: str = "",
    flags: Mapping[str, str] | None = None,
    exclude: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """Decorate a click command with one option per field of ``cls``.

    ``strip`` drops a field-name prefix from the flag (``streams_app_id`` → ``--app-id``);
    ``flags`` names a field's flag explicitly (``{"recs_k": "--k"}``) where a shorter or older
    name is kept. Each option's value arrives under the field's name, ``None`` when not given.
    """
    names = dict(flags or {})

    def decorate(command: F) -> F:
        for field in reversed(option_fields(cls, exclude)):
            info = cls.model_fields[field]
            flag = names.get(field) or _flag(field, strip)
            help_text = _help(cls, field, info)
            if _inner(info.annotation)[0] is bool:
                negative = "--no-" + flag.removeprefix("--")
                decorator = click.option(f"{flag}/{negative}", field, default=None, help=help_text)
            else:
                decorator = click.option(
                    flag, field, type=_click_type(info.annotation), default=None, help=help_text
                )
            command = decorator(command)
        return command

    return decorate


def given(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags that were passed, to lay over the environment: ``Settings(**given(flags))``."""
    return {k: v for k, v in flags.items() if v is not None}
