"""`recstream doctor`: what the local stack and the demo need, checked, one line each with its fix.

A first run otherwise stops at a stack trace: no JDK, port 9092 held by something else, a Redis too
old for the fold's commands, no dataset, no trained model. Each check here looks at one of those
without changing anything and says how to fix what it finds. A Kafka or Redis that already
answers on the configured address counts as ours (``stack up`` reuses it), so a running stack
passes. ``./scripts/demo`` runs it first and stops with its advice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import click

from cli.stack import MIN_JAVA, POM, Stack

__all__ = ["Check", "Context", "doctor", "run_checks"]

Status = Literal["ok", "warn", "fail"]
# ZADD ... GT (fold.lua) and COPY (profile rebuilds) arrived in Redis 6.2.
MIN_REDIS = (6, 2)
GIB = 1 << 30
INSTALL_JAVA = (
    "install a JDK 17+: `sudo apt-get install openjdk-17-jre-headless` (./scripts/bootstrap)"
)
INSTALL_REDIS = "install Redis 6.2+: `sudo apt-get install redis-server` (./scripts/bootstrap)"


@dataclass(frozen=True)
class Check:
    """One finding: ok, warn (works, with a caveat) or fail (the demo would stop), and the fix."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Context:
    """What the checks look at; the tests point it at fakes (a PATH, ports, folders)."""

    stack: Stack
    data_dir: Path
    dataset: str = "ml-100k"
    artifact_dir: Path = Path("artifacts/ml-100k")
    # label -> (port, the variable that moves it); the services `recstream run` starts.
    service_ports: dict[str, tuple[int, str]] = field(default_factory=dict)
    path: str | None = None  # the PATH tools are looked up on; None: this process's
    min_free_bytes: int = 1 * GIB
    warn_free_bytes: int = 3 * GIB

    @functools.cached_property
    def kafka_up(self) -> bool:
        return self.stack.kafka_ready()

    @functools.cached_property
    def redis_up(self) -> bool:
        return self.stack.redis_ready()

    def which(self, tool: str) -> str | None:
        return shutil.which(tool, path=self.path)

    def run(self, *cmd: str) -> str:
        """stdout and stderr of a short tool invocation (``--version`` and the like)."""
        env = {**os.environ, "PATH": self.path} if self.path is not None else None
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=30, check=False, env=env
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"<{exc}>"
        return done.stdout + done.stderr


def _version(text: str, pattern: str) -> tuple[int, ...] | None:
    match = re.search(pattern, text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def check_python(ctx: Context) -> Check:
    # recstream installs only on 3.11+, so this one names the interpreter rather than judging it.
    version = ".".join(map(str, sys.version_info[:3]))
    return Check("python", "ok", f"Python {version} ({sys.executable})")


def check_java(ctx: Context) -> Check:
    java = ctx.which("java")
    reused = f"not needed while the Kafka on {ctx.stack.settings.kafka_bootstrap} answers"
    if java is None:
        if ctx.kafka_up:
            return Check("java", "warn", f"no java on PATH; {reused}", INSTALL_JAVA)
        return Check("java", "fail", "no java on PATH: the Kafka broker runs on it", INSTALL_JAVA)
    text = ctx.run(java, "-version")
    found = _version(text, r'version "([0-9._]+)')
    if found is None:
        return Check(
            "java", "fail", f"cannot read the version of {java}: {text[:80]!r}", INSTALL_JAVA
        )
    major = found[1] if found[0] == 1 and len(found) > 1 else found[0]  # "1.8.0" is Java 8
    if major < MIN_JAVA:
        status: Status = "warn" if ctx.kafka_up else "fail"
        return Check(
            "java", status, f"Java {major} at {java}; Kafka 4 needs {MIN_JAVA}+", INSTALL_JAVA
        )
    return Check("java", "ok", f"Java {major} ({java})")


def check_kafka(ctx: Context) -> Check:
    libs = ctx.stack.kafka_libs
    marker = libs / ".pom.sha"
    pom_id = hashlib.sha256(POM.read_text().encode()).hexdigest()
    if ctx.kafka_up:
        return Check("kafka", "ok", f"a broker answers on {ctx.stack.settings.kafka_bootstrap}")
    if marker.is_file() and marker.read_text() == pom_id:
        return Check("kafka", "ok", f"broker jars cached in {libs}")
    mvn = ctx.which("mvn")
    if mvn is not None:
        return Check(
            "kafka",
            "ok",
            f"Maven at {mvn}: `recstream stack up` resolves the broker from Maven Central once "
            "(network needed that time)",
        )
    return Check(
        "kafka",
        "fail",
        f"no broker jars in {libs} and no Maven to resolve them",
        "install Maven: `sudo apt-get install maven` (./scripts/bootstrap), or point "
        "RECSTREAM_KAFKA_BOOTSTRAP at a running broker",
    )


def check_redis(ctx: Context) -> Check:
    if ctx.redis_up:
        import redis

        client = redis.Redis.from_url(
            ctx.stack.settings.redis_url.get_secret_value(), socket_connect_timeout=2.0
        )
        try:
            text = str(client.info("server").get("redis_version", ""))
        except redis.RedisError as exc:
            text = f"<{exc}>"
        finally:
            client.close()
        where = "the running Redis"
        found = _version(text, r"^([0-9]+\.[0-9]+(?:\.[0-9]+)?)")
    else:
        binary = ctx.which("redis-server")
        if binary is None:
            return Check(
                "redis", "fail", "no redis-server on PATH and no Redis answers", INSTALL_REDIS
            )
        where = binary
        found = _version(ctx.run(binary, "--version"), r"v=([0-9]+\.[0-9]+(?:\.[0-9]+)?)")
    if found is None:
        return Check("redis", "fail", f"cannot read the version of {where}", INSTALL_REDIS)
    shown = ".".join(map(str, found))
    if found[:2] < MIN_REDIS:
        return Check(
            "redis",
            "fail",
            f"Redis {shown} ({where}); the fold needs 6.2+ (ZADD GT)",
            INSTALL_REDIS,
        )
    return Check("redis", "ok", f"Redis {shown} ({where})")


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def check_ports(ctx: Context) -> list[Check]:
    """Kafka's and Redis's ports are free or held by a Kafka/Redis that answers; the rest free."""
    checks = []
    k_host, k_port = ctx.stack.kafka_hostport
    r_host, r_port = ctx.stack.redis_hostport
    owned = [
        ("kafka", k_host, k_port, lambda: ctx.kafka_up, "RECSTREAM_KAFKA_BOOTSTRAP"),
        ("kafka controller", k_host, k_port + 1, lambda: ctx.kafka_up, "RECSTREAM_KAFKA_BOOTSTRAP"),
        ("redis", r_host, r_port, lambda: ctx.redis_up, "RECSTREAM_REDIS_URL"),
    ]
    for label, host, port, answers, env in owned:
        if host in ("127.0.0.1", "localhost", "::1"):  # a remote one is not started here
            checks.append(_port_check(label, host, port, answers, env))
    for label, (port, env) in ctx.service_ports.items():
        checks.append(_port_check(label, "127.0.0.1", port, lambda: False, env))
    return checks


def _port_check(label: str, host: str, port: int, ours: Callable[[], bool], env: str) -> Check:
    name = f"port {port}"
    if not _port_open(host, port):
        return Check(name, "ok", f"free ({label})")
    if ours():
        return Check(name, "ok", f"held by the {label} that answers there (reused)")
    return Check(
        name,
        "fail",
        f"{host}:{port} ({label}) is taken by another program",
        f"stop it (`ss -ltnp 'sport = :{port}'` shows which) or move {label} with {env}",
    )


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(ctx: Context) -> Check:
    places = {
        "the stack's files": ctx.stack.dir,
        "the datasets": ctx.data_dir,
        "the model": ctx.artifact_dir,
    }
    free = {what: shutil.disk_usage(_existing(path)).free for what, path in places.items()}
    what, least = min(free.items(), key=lambda kv: kv[1])
    detail = f"{least / GIB:.1f} GiB free for {what} ({_existing(places[what])})"
    fix = "free some space: Kafka's jars and logs, the datasets and the model need about 3 GiB"
    if least < ctx.min_free_bytes:
        return Check("disk", "fail", detail, fix)
    if least < ctx.warn_free_bytes:
        return Check("disk", "warn", detail, fix)
    return Check("disk", "ok", detail)


def check_data(ctx: Context) -> Check:
    from lab.datasets import NAMED, resolve
    from lab.exceptions import DatasetError
    from lab.fetch import archive_for, provenance, verify_folder

    name = ctx.dataset
    if name not in NAMED:  # a folder in the generic format: present and readable is all
        try:
            _, folder = resolve(name, ctx.data_dir)
        except DatasetError as exc:
            return Check(
                "data", "fail", str(exc), "point --dataset at a folder with interactions.csv"
            )
        return Check("data", "ok", f"{folder} has interactions.csv")
    archive = archive_for(name)
    folder = ctx.data_dir / archive.name
    fetch = f"recstream data fetch {name}"
    if not folder.is_dir():
        return Check("data", "fail", f"{name} is not in {ctx.data_dir}", f"`{fetch}`")
    problems = verify_folder(folder, archive)
    if problems:
        detail = f"{folder} does not verify: {problems[0]}"
        return Check("data", "fail", detail, f"`{fetch} --force`")
    record = provenance(folder)
    origin = f"fetched {record.get('fetched_at')}" if record else "copy in place"
    return Check(
        "data", "ok", f"{name} in {folder}: {len(archive.files)} files verified ({origin})"
    )


def check_artifact(ctx: Context) -> Check:
    from inference.exceptions import ArtifactError
    from inference.integrity import SIGNATURE_NAME, verify_keys, verify_manifest
    from inference.settings import ArtifactTrust

    folder = ctx.artifact_dir
    train = f"`recstream train --dataset {ctx.dataset} --out {folder}`"
    if not (folder / "manifest.json").is_file():
        return Check(
            "model",
            "warn",
            f"no trained model in {folder}",
            "the demo trains one on its first run (up to about twice --train-minutes, 5 by "
            f"default), or {train}",
        )
    trust = ArtifactTrust()
    demo_key = ctx.stack.dir / "artifact-keys" / "artifact-signing.pub"
    unsigned = not (folder / SIGNATURE_NAME).exists()
    try:
        if not verify_keys(trust) and demo_key.is_file():  # the key pair the demo signs with
            trust = trust.model_copy(update={"verify_key_file": demo_key})
        if unsigned:
            trust = trust.model_copy(update={"allow_unsigned": True})
        verified = verify_manifest(folder, trust)
    except ArtifactError as exc:
        return Check(
            "model",
            "fail",
            f"{folder} does not verify: {exc}",
            f"never serve it: delete {folder} and train again ({train})",
        )
    if unsigned:
        return Check(
            "model",
            "warn",
            f"{folder}: files match its manifest, but it is unsigned",
            "the demo signs it after checking it; elsewhere `recstream artifact sign "
            f"{folder} --adopt-unsigned`",
        )
    return Check("model", "ok", f"{folder} verified (signed by key {verified.signed_by})")


def check_gpu(ctx: Context) -> Check:
    smi = ctx.which("nvidia-smi")
    if smi is not None:
        first = ctx.run(smi, "-L").strip().splitlines()
        if first and first[0].startswith("GPU"):
            return Check("gpu", "ok", first[0])
    if Path("/dev/nvidia0").exists():
        return Check("gpu", "ok", "an NVIDIA device is present (no nvidia-smi to name it)")
    return Check("gpu", "ok", "none visible: training and serving run on the CPU (slower)")


def run_checks(ctx: Context) -> list[Check]:
    """Every check, in the order a first run meets the problems."""
    return [
        check_python(ctx),
        check_java(ctx),
        check_kafka(ctx),
        check_redis(ctx),
        *check_ports(ctx),
        check_disk(ctx),
        check_data(ctx),
        check_artifact(ctx),
        check_gpu(ctx),
    ]


def default_context(dataset: str, artifact_dir: Path) -> Context:
    """The context of this machine: the stack's and the services' settings from the environment."""
    from api.settings import ApiSettings
    from consumers.settings import CacheWriterSettings, RegenSettings
    from lab.settings import FetchSettings
    from recstream.options import env_name
    from streams.settings import StreamsSettings

    ports: dict[str, tuple[int, str]] = {}
    for cls in (ApiSettings, RegenSettings, CacheWriterSettings, StreamsSettings):
        settings = cls()
        for name, value in settings.model_dump().items():
            if name.endswith("_port") and isinstance(value, int) and value > 0:
                ports[name.removesuffix("_port").replace("_", " ")] = (value, env_name(cls, name))
    if "streams metrics" not in ports:  # `recstream run` gives the Faust worker this one
        ports["streams metrics"] = (9101, env_name(StreamsSettings, "streams_metrics_port"))
    return Context(
        stack=Stack(),
        data_dir=FetchSettings().data_dir,
        dataset=dataset,
        artifact_dir=artifact_dir,
        service_ports=ports,
    )


_COLOURS = {"ok": "green", "warn": "yellow", "fail": "red"}


@click.command("doctor")
@click.option("--dataset", default="ml-100k", show_default=True, help="The dataset to check.")
@click.option(
    "--artifact-dir",
    type=click.Path(path_type=Path),
    default=Path("artifacts/ml-100k"),
    show_default=True,
    help="The trained model to check (the demo's).",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def doctor(dataset: str, artifact_dir: Path, as_json: bool) -> None:
    """Check what the stack and the demo need; one line per check with its fix.

    Exits 1 when a check fails (the demo would stop there); warnings still let it run.
    """
    checks = run_checks(default_context(dataset, artifact_dir))
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            fix = f"  -> {c.fix}" if c.fix else ""
            click.secho(f"{c.status:4}  {c.name:16} {c.detail}{fix}", fg=_COLOURS[c.status])
    if any(c.status == "fail" for c in checks):
        sys.exit(1)
