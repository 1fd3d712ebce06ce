"""The embeddings publisher's wiring: its command's options, `recstream run`, profile embedding."""

from __future__ import annotations

from datetime import UTC, datetime

import click
import numpy as np
import pytest

from cli.main import main
from cli.run import OPTIONAL, Pipeline
from consumers.embeddings import ItemVectors
from consumers.settings import EmbeddingsSettings
from inference.exceptions import InferenceError
from inference.privacy import GaussianMechanism, epsilon_to_rho
from recstream.options import env_name, option_fields
from schemas import Profile


def _serve_embeddings() -> click.Command:
    serve = main.commands["serve"]
    assert isinstance(serve, click.Group)
    return serve.commands["embeddings"]


def test_every_setting_is_an_option_naming_its_env_var_and_secrets_stay_off() -> None:
    options = {p.name: p for p in _serve_embeddings().params if isinstance(p, click.Option)}
    for field in option_fields(EmbeddingsSettings):
        assert field in options, field
        assert env_name(EmbeddingsSettings, field) in (options[field].help or ""), field
    assert "redis_url" not in options


def test_the_defaults_are_the_issues_epsilon_one_delta_1e5_and_a_budget_of_ten() -> None:
    s = EmbeddingsSettings()
    assert (s.embeddings_epsilon, s.embeddings_delta, s.embeddings_budget_epsilon) == (1, 1e-5, 10)
    assert s.topic_profile_embeddings == "profiles.embeddings"
    assert s.topic_profile_embeddings in s.topics()
    # The budget holds a few dozen releases at ε = 1 under zCDP (basic composition: ten).
    assert 30 < epsilon_to_rho(10.0, 1e-5) / GaussianMechanism().rho < 60


def test_run_starts_the_publisher_only_when_its_artifact_is_configured() -> None:
    var = OPTIONAL["embeddings"]
    assert "embeddings" not in Pipeline(env={}).names
    names = Pipeline(env={var: "/some/artifact"}).names
    assert names == ["streams", "regen", "embeddings", "cache-writer", "api"]
    assert "embeddings" not in Pipeline(exclude={"embeddings"}, env={var: "/x"}).names


def _profile(weights: dict[str, float]) -> Profile:
    return Profile(
        user_id="u",
        version=3,
        event_count=len(weights),
        last_event_ts=datetime(2026, 1, 1, tzinfo=UTC),
        half_life_s=3600.0,
        recent_items=list(weights),
        item_weights=weights,
        category_affinities={},
    )


def test_a_profile_embeds_as_the_weighted_mean_of_its_known_items() -> None:
    matrix = np.eye(3, dtype=np.float32)
    vectors = ItemVectors({"a": 0, "b": 1, "c": 2}, matrix)
    got = vectors.embed(_profile({"a": 3.0, "b": 1.0, "unknown": 5.0}))
    assert got is not None
    np.testing.assert_allclose(got, np.array([3.0, 1.0, 0.0]) / np.sqrt(10.0), rtol=1e-6)
    assert vectors.embed(_profile({"unknown": 1.0})) is None
    assert vectors.embed(_profile({})) is None


def test_a_budget_smaller_than_one_release_is_refused() -> None:
    with pytest.raises(InferenceError):
        from consumers.embeddings import EmbeddingsService

        EmbeddingsService(
            EmbeddingsSettings(embeddings_budget_epsilon=0.5),
            ItemVectors({"a": 0}, np.eye(1, dtype=np.float32)),
        )
