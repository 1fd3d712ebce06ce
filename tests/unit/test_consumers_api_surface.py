"""The public surface of the consumers and api packages is what their ``__all__`` says."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    ("package", "names"),
    [
        (
            "consumers",
            {
                "CacheWriter",
                "CacheWriterSettings",
                "Coalescer",
                "DeadReason",
                "OffsetTracker",
                "RecsCache",
                "ItemTitles",
                "RecentCounts",
                "RecsPublisher",
                "RegenService",
                "RegenSettings",
                "build_pool",
                "model_history",
            },
        ),
        ("api", {"ApiSettings", "build_app"}),
    ],
)
def test_public_names(package: str, names: set[str]) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == names
    for name in names:
        assert getattr(module, name) is not None


def test_settings_read_the_environment_and_hide_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from api import ApiSettings
    from consumers import CacheWriterSettings, RegenSettings

    monkeypatch.setenv("RECSTREAM_REGEN_METRICS_PORT", "9999")
    monkeypatch.setenv("RECSTREAM_REGEN_DEBOUNCE_MS", "5")
    monkeypatch.setenv("RECSTREAM_API_KEY", "hunter2")
    assert RegenSettings().regen_metrics_port == 9999
    assert RegenSettings().regen_debounce_ms == 5.0
    assert CacheWriterSettings().cache_metrics_port == 9103  # its own variable
    settings = ApiSettings()
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)
    monkeypatch.delenv("RECSTREAM_REGEN_METRICS_PORT")
    assert (RegenSettings().regen_metrics_port, CacheWriterSettings().cache_metrics_port) == (
        9102,
        9103,
    )
