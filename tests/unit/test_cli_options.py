"""Service commands take their options from the settings fields; a flag beats its env var."""

from __future__ import annotations

import click
import pytest
from pydantic_settings import BaseSettings

from api.settings import ApiSettings
from cli.main import main
from cli.run import RunSettings
from consumers.settings import CacheWriterSettings, RegenSettings
from recstream.options import env_name, given, option_fields
from streams.settings import StreamsSettings

SERVICES: dict[str, type[BaseSettings]] = {
    "streams": StreamsSettings,
    "regen": RegenSettings,
    "cache-writer": CacheWriterSettings,
    "api": ApiSettings,
}
TOOLS: dict[str, type[BaseSettings]] = {"run": RunSettings}


def _command(name: str) -> click.Command:
    if name in TOOLS:
        return main.commands[name]
    serve = main.commands["serve"]
    assert isinstance(serve, click.Group)
    return serve.commands[name]


@pytest.mark.parametrize("service", sorted({**SERVICES, **TOOLS}))
def test_every_settings_field_is_an_option_naming_its_env_var(service: str) -> None:
    cls = {**SERVICES, **TOOLS}[service]
    options = {p.name: p for p in _command(service).params if isinstance(p, click.Option)}
    for field in option_fields(cls):
        assert field in options, f"{service}: no option for {field}"
        assert env_name(cls, field) in (options[field].help or ""), field


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_secrets_stay_off_the_command_line(service: str) -> None:
    names = {p.name for p in _command(service).params}
    assert "redis_url" not in names
    assert "api_key" not in names


def test_a_flag_wins_over_the_env_var_and_the_env_var_over_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSTREAM_REGEN_GROUP_ID", "from-env")
    monkeypatch.setenv("RECSTREAM_REGEN_DEBOUNCE_MS", "7")
    ctx = _command("regen").make_context("regen", ["--group-id", "from-flag", "--k", "3"])
    settings = RegenSettings(**given(ctx.params))
    assert settings.regen_group_id == "from-flag"
    assert settings.regen_k == 3
    assert settings.regen_debounce_ms == 7.0  # no flag: the environment applies


def test_boolean_fields_take_a_negative_flag() -> None:
    ctx = _command("streams").make_context("streams", ["--no-fast-drain"])
    assert StreamsSettings(**given(ctx.params)).streams_fast_drain is False
    ctx = _command("streams").make_context("streams", [])
    assert StreamsSettings(**given(ctx.params)).streams_fast_drain is True


def test_pool_settings_are_a_sub_model_fed_by_flags_and_its_own_env_vars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSTREAM_REGEN_POOL__MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("RECSTREAM_REGEN_POOL__QUEUE_SIZE", "9")
    ctx = _command("regen").make_context("regen", ["--workers", "2", "--queue-size", "5"])
    pool = RegenSettings(**given(ctx.params)).regen_pool
    assert (pool.workers, pool.queue_size, pool.max_batch_size) == (2, 5, 4)
    help_text = _command("regen").get_help(ctx)
    assert "RECSTREAM_REGEN_POOL__WORKERS" in help_text
