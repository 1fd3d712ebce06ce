"""`recstream doctor`: each check passes on a sound machine and fails the way a first run would.

Failures are provoked without root: a PATH of fake tools, a socket holding a port, an empty data
directory, a changed dataset or model file. The stack the checks look at is pointed at free ports,
so nothing here talks to a real Kafka or Redis.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.doctor import (
    Context,
    check_artifact,
    check_data,
    check_disk,
    check_gpu,
    check_java,
    check_kafka,
    check_ports,
    check_redis,
    run_checks,
)
from cli.stack import POM, Stack, StackSettings
from cli.supervise import free_port
from inference.integrity import generate_keypair, signing_key, write_manifest
from inference.settings import ArtifactSigning
from lab.fetch import ARCHIVES
from recstream.settings import CommonSettings
from tests.unit.tamper import flip_last_byte

SHARED_DATA = CommonSettings().data_dir


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Context:
    for name in ("VERIFY_KEY", "VERIFY_KEY_FILE", "ALLOW_UNSIGNED"):
        monkeypatch.delenv(f"RECSTREAM_ARTIFACT_{name}", raising=False)
    settings = StackSettings(
        stack_dir=tmp_path / "stack",
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    context = Context(
        stack=Stack(settings),
        data_dir=SHARED_DATA,
        artifact_dir=tmp_path / "artifact",
        path=str(tmp_path / "bin"),
    )
    (tmp_path / "bin").mkdir()
    context.kafka_up = False  # a cached_property, fixed for the test
    context.redis_up = False
    return context


def _tool(ctx: Context, name: str, output: str, *, stderr: bool = False) -> None:
    assert ctx.path is not None
    script = Path(ctx.path) / name
    target = " >&2" if stderr else ""
    # Only shell built-ins: the fake PATH holds nothing else.
    script.write_text(f"#!/bin/sh\necho '{output}'{target}\n")
    script.chmod(0o755)


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_java(ctx: Context) -> None:
    assert check_java(ctx).status == "fail"
    assert "openjdk-17" in check_java(ctx).fix
    _tool(ctx, "java", 'openjdk version "11.0.2" 2019-01-15', stderr=True)
    old = check_java(ctx)
    assert old.status == "fail"
    assert "Java 11" in old.detail
    _tool(ctx, "java", 'openjdk version "17.0.15" 2025-04-15', stderr=True)
    assert check_java(ctx).status == "ok"
    _tool(ctx, "java", 'java version "1.8.0_292"', stderr=True)
    assert "Java 8" in check_java(ctx).detail


def test_java_missing_is_only_a_warning_while_a_kafka_answers(ctx: Context) -> None:
    ctx.kafka_up = True  # a cached_property, fixed for the test
    assert check_java(ctx).status == "warn"


def test_kafka_needs_cached_jars_or_maven(ctx: Context) -> None:
    missing = check_kafka(ctx)
    assert missing.status == "fail"
    assert "maven" in missing.fix
    _tool(ctx, "mvn", "Apache Maven 3.8.7")
    assert check_kafka(ctx).status == "ok"
    (Path(ctx.path or "") / "mvn").unlink()
    libs = ctx.stack.kafka_libs
    libs.mkdir(parents=True)
    (libs / ".pom.sha").write_text(hashlib.sha256(POM.read_text().encode()).hexdigest())
    cached = check_kafka(ctx)
    assert cached.status == "ok"
    assert "cached" in cached.detail


def test_redis_version(ctx: Context) -> None:
    assert check_redis(ctx).status == "fail"
    _tool(ctx, "redis-server", "Redis server v=5.0.7 sha=00000000:0 malloc=jemalloc-5.2.1")
    old = check_redis(ctx)
    assert old.status == "fail"
    assert "6.2+" in old.detail
    _tool(ctx, "redis-server", "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0")
    assert check_redis(ctx).status == "ok"


def test_ports_free_held_by_our_stack_or_taken(ctx: Context, held_port: int) -> None:
    assert all(c.status == "ok" for c in check_ports(ctx))
    ctx.service_ports = {"api": (held_port, "RECSTREAM_API_PORT")}
    taken = [c for c in check_ports(ctx) if c.status == "fail"]
    assert [c.name for c in taken] == [f"port {held_port}"]
    assert "RECSTREAM_API_PORT" in taken[0].fix


def test_the_kafka_port_is_fine_when_the_kafka_there_answers(ctx: Context, held_port: int) -> None:
    ctx.stack = Stack(
        ctx.stack.settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{held_port}"})
    )
    kafka = next(c for c in check_ports(ctx) if c.name == f"port {held_port}")
    assert kafka.status == "fail"  # something holds it that is not a broker
    ctx.kafka_up = True  # a cached_property, fixed for the test
    kafka = next(c for c in check_ports(ctx) if c.name == f"port {held_port}")
    assert kafka.status == "ok"
    assert "reused" in kafka.detail


def test_disk(ctx: Context) -> None:
    assert check_disk(ctx).status == "ok"
    ctx.warn_free_bytes = 1 << 62
    assert check_disk(ctx).status == "warn"
    ctx.min_free_bytes = 1 << 62
    assert check_disk(ctx).status == "fail"


def test_data_present_missing_and_tampered(ctx: Context, tmp_path: Path) -> None:
    assert check_data(ctx).status == "ok"
    ctx.data_dir = tmp_path / "empty"
    missing = check_data(ctx)
    assert missing.status == "fail"
    assert missing.fix == "`recstream data fetch ml-100k`"
    copy = tmp_path / "copy" / "ml-100k"
    copy.mkdir(parents=True)
    for name in ARCHIVES["ml-100k"].files:
        shutil.copyfile(SHARED_DATA / "ml-100k" / name, copy / name)
    ctx.data_dir = copy.parent
    assert check_data(ctx).status == "ok"
    flip_last_byte(copy / "u.item")
    tampered = check_data(ctx)
    assert tampered.status == "fail"
    assert "u.item" in tampered.detail
    assert tampered.fix == "`recstream data fetch ml-100k --force`"


def test_model_missing_verified_unsigned_and_tampered(ctx: Context) -> None:
    missing = check_artifact(ctx)
    assert missing.status == "warn"
    assert "recstream train" in missing.fix
    folder = ctx.artifact_dir
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"tiny model")
    write_manifest(folder, {})
    assert check_artifact(ctx).status == "warn"  # unsigned: the demo signs it
    key_file, _ = generate_keypair(ctx.stack.dir / "artifact-keys")  # the demo's key pair
    write_manifest(folder, {}, signing_key(ArtifactSigning(signing_key_file=key_file)))
    signed = check_artifact(ctx)
    assert signed.status == "ok", signed
    flip_last_byte(folder / "weights.bin")
    tampered = check_artifact(ctx)
    assert tampered.status == "fail"
    assert "delete" in tampered.fix


def test_gpu_is_reported_either_way(ctx: Context) -> None:
    if not Path("/dev/nvidia0").exists():
        assert "none visible" in check_gpu(ctx).detail
    _tool(ctx, "nvidia-smi", "GPU 0: NVIDIA H200 (UUID: GPU-0000)")
    gpu = check_gpu(ctx)
    assert gpu.status == "ok"
    assert gpu.detail.startswith("GPU 0: NVIDIA H200")


def test_every_check_has_a_fix_when_it_does_not_pass(ctx: Context) -> None:
    checks = run_checks(ctx)
    assert {c.name for c in checks} >= {"java", "kafka", "redis", "disk", "data", "model", "gpu"}
    assert all(c.fix for c in checks if c.status != "ok")


def test_the_command_exits_1_with_the_fix_when_data_is_missing(tmp_path: Path) -> None:
    from cli.main import main

    env = {
        "RECSTREAM_DATA_DIR": str(tmp_path / "nothing"),
        "RECSTREAM_STACK_DIR": str(tmp_path / "stack"),
        "RECSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "RECSTREAM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    args = ["doctor", "--json", "--artifact-dir", str(tmp_path / "model")]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert checks["data"]["status"] == "fail"
    assert checks["data"]["fix"] == "`recstream data fetch ml-100k`"
