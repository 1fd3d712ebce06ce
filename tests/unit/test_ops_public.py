"""The ops package's public surface and its commands' help."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import ops
from cli.main import main
from recstream.keys import Keys


def test_every_public_name_resolves() -> None:
    for name in ops.__all__:
        assert getattr(ops, name) is not None, name
    with pytest.raises(AttributeError):
        _ = ops.NoSuchThing


def test_namespace_keys_nest_under_the_live_prefix() -> None:
    live = Keys("app:")
    side = live.namespace("r1")
    assert side.prefix == "app:ns:r1:"
    assert side.profile("u") == "app:ns:r1:u:{u}:profile"
    assert side.replay_state() == "app:ns:r1:replay:state"
    # A live scan for "app:u:{*}:seen" cannot match the namespace's seen-sets.
    assert not side.seen("u").startswith("app:u:")


def test_bad_namespace_names_are_refused() -> None:
    from ops.rebuild import ProfileRebuild

    with pytest.raises(ops.ReplayError, match="namespace"):
        ProfileRebuild(ops.OpsSettings(), "has space")


@pytest.mark.parametrize(
    "args",
    [["replay"], ["replay", "profiles"], ["replay", "regen"], ["replay", "compare"]],
)
def test_every_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert len(result.output.splitlines()) > 5


def test_exclusive_start_options_are_a_usage_error() -> None:
    result = CliRunner().invoke(
        main,
        ["replay", "profiles", "--from-beginning", "--from-time", "2026-01-01T00:00:00Z"],
    )
    assert result.exit_code == 2
    assert "exclude each other" in result.output


def test_times_need_an_offset() -> None:
    result = CliRunner().invoke(
        main,
        [
            "replay",
            "regen",
            "--from-time",
            "2026-01-01T00:00:00",
            "--to-time",
            "2026-01-02T00:00:00Z",
            "--out-topic",
            "x",
        ],
    )
    assert result.exit_code == 2
    assert "UTC offset" in result.output
