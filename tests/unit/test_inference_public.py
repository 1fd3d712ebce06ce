"""The inference package's public surface: every name in __all__ resolves, heavy ones lazily."""

from __future__ import annotations

import subprocess
import sys

import inference


def test_every_public_name_resolves() -> None:
    for name in inference.__all__:
        assert getattr(inference, name) is not None, name


def test_unknown_names_raise_attribute_error() -> None:
    try:
        inference.no_such_thing  # noqa: B018 - the attribute access is the test
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("unknown attribute resolved")


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, inference; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
