"""The provisioned Grafana dashboard: valid, on the provisioned datasource, real metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "recstream.json"

# What the operations issue asks the dashboard to show, by the metric that carries it.
REQUIRED = {
    "events in": "recs_stream_events_in_total",
    "events folded": "recs_stream_events_folded_total",
    "events out": "recs_stream_events_out_total",
    "dead-lettered by reason": "recs_stream_dead_lettered_total",
    "fold latency": "recs_stream_fold_latency_seconds_bucket",
    "profile changes": "recs_stream_profile_changes_emitted_total",
    "regeneration latency": "recs_regen_latency_seconds_bucket",
    "pool latency": "recs_pool_request_latency_seconds_bucket",
    "batch sizes": "recs_pool_batch_size_bucket",
    "regeneration poll batch sizes": "recs_regen_poll_batch_messages_bucket",
    "pool queue depth": "recs_pool_queue_depth",
    "fallbacks": "recs_pool_fallbacks_total",
    "freshness to the output topic": "recs_regen_freshness_seconds_bucket",
    "end-to-end freshness into the cache": "recs_cache_freshness_seconds_bucket",
    "cache writes": "recs_cache_writes_total",
    "stale rejections": "recs_cache_stale_rejections_total",
    "read API latency": "recs_api_request_latency_seconds_bucket",
    "consumer lag": "recs_consumer_lag_messages",
}


def defined_metrics() -> set[str]:
    """Sample names of every recs_ metric the services register (importing their modules)."""
    from importlib import import_module

    for module in ("api.metrics", "consumers.metrics", "inference.pool", "streams.metrics"):
        import_module(module)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("recs_"):
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioned = (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert "uid: prometheus" in provisioned
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"


def test_every_metric_on_the_dashboard_is_defined_by_a_service(dashboard: dict[str, Any]) -> None:
    used = {m for e in exprs(dashboard) for m in re.findall(r"recs_[a-z0-9_]+", e)}
    unknown = used - defined_metrics()
    assert not unknown, f"dashboard queries metrics no service defines: {sorted(unknown)}"


def test_lag_is_shown_per_topic_and_partition(dashboard: dict[str, Any]) -> None:
    lag = [e for e in exprs(dashboard) if "recs_consumer_lag_messages" in e]
    assert any(re.search(r"by \(group, topic, partition\)", e) for e in lag), lag


@pytest.mark.parametrize("what", sorted(REQUIRED))
def test_the_dashboard_shows(dashboard: dict[str, Any], what: str) -> None:
    metric = REQUIRED[what]
    assert metric in defined_metrics(), f"{metric} is no longer defined"
    assert any(metric in e for e in exprs(dashboard)), f"no panel shows {what} ({metric})"
