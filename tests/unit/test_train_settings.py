"""`recstream train --set KEY=VALUE`: any transformer setting, typed, and typos refused early."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lab.cli import gen_settings, train_cmd


def test_settings_take_their_fields_types() -> None:
    got = gen_settings(["ema=0.5", "future=3", "text_init=false", "lr_schedule=cosine"])
    assert got == {"ema": 0.5, "future": 3, "text_init": False, "lr_schedule": "cosine"}
    assert isinstance(got["future"], int)


@pytest.mark.parametrize(
    ("pair", "says"),
    [
        ("emma=0.5", "KEY one of"),
        ("ema", "KEY one of"),
        ("n_items=5", "KEY one of"),
        ("future=three", "must be int"),
        ("text_init=maybe", "true or false"),
    ],
)
def test_bad_settings_are_refused(pair: str, says: str) -> None:
    with pytest.raises(click.BadParameter, match=says):
        gen_settings([pair])


def test_train_refuses_a_bad_setting_before_loading_data() -> None:
    result = CliRunner().invoke(
        train_cmd, ["--dataset", "no-such-dataset", "--out", "x", "--set", "futur=3"]
    )
    assert result.exit_code == 2
    assert "futur=3" in result.output


@pytest.mark.parametrize("extra", [["--set", "future=2"], ["--negatives", "100"]])
def test_train_refuses_distillation_without_the_full_next_item_softmax(
    extra: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        train_cmd,
        ["--dataset", "ml-100k", "--out", str(tmp_path), "--set", "distill=0.5", *extra],
    )
    assert result.exit_code == 2, result.output
    assert "distill needs the full softmax" in result.output
