"""Click options generated from a settings class, so flags, env names and help never drift.

Each service's settings fields are the one statement of what can be configured: a field becomes
``--flag`` (the field name in kebab case, the service's own prefix dropped, or a name given for
compatibility), its help is the field's description followed by its environment variable and
default; a sub-model's fields are flagged by their own name. Options default to "not given", so
the environment applies unless a flag is passed. Secret fields stay off the command line (a
process list would show them); the command's help names their variables instead.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

__all__ = ["env_name", "given", "option_fields", "settings_options"]

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound=BaseSettings)


NESTED = "__"  # joins a sub-model field to its parent, in env names and option destinations


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field (``pool__workers`` for a sub-model's) reads."""
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def _inner(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` with ``None`` removed from a union."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def _is_secret(info: FieldInfo) -> bool:
    return _inner(info.annotation)[0] is SecretStr


def _fields(cls: type[BaseModel], prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf field by its path; a sub-model's fields as ``parent__child``."""
    found: dict[str, FieldInfo] = {}
    for name, info in cls.model_fields.items():
        kind = _inner(info.annotation)[0]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found.update(_fields(kind, f"{prefix}{name}{NESTED}"))
        else:
            found[f"{prefix}{name}"] = info
    return found


def option_fields(
    cls: type[BaseSettings], exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> list[str]:
    """The fields of ``cls`` that become options: ``only`` or all, less secrets and ``exclude``."""
    return [
        name
        for name, info in _fields(cls).items()
        if name not in exclude and not _is_secret(info) and (only is None or name in only)
    ]


def _flag(field: str, strip: str) -> str:
    # A sub-model's field is flagged by its own name: --workers for regen_pool__workers.
    name = field.rpartition(NESTED)[2] if NESTED in field else field.removeprefix(strip)
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
    only: tuple[str, ...] | None = None,
) -> Callable[[F], F]:
    """Decorate a click command with one option per field of ``cls``.

    ``strip`` drops a field-name prefix from the flag (``streams_app_id`` → ``--app-id``);
    ``flags`` names a field's flag explicitly (``{"replay_k": "--k"}``) where a shorter or older
    name is kept; ``only`` limits the options to the fields a tool uses. Each option's value
    arrives under the field's name, ``None`` when not given.
    """
    names = dict(flags or {})
    infos = _fields(cls)

    def decorate(command: F) -> F:
        for field in reversed(option_fields(cls, exclude, only)):
            info = infos[field]
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
    """The flags that were passed, to lay over the environment: ``Settings(**given(flags))``.

    Sub-model fields are nested again; the settings merge them with the sub-model's environment.
    """
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        *parents, leaf = key.split(NESTED)
        target = out
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return out
