"""The real local stack: Apache Kafka (KRaft, single node) and Redis, run as plain processes.

`recstream stack up` assembles the Kafka broker from Maven Central artifacts (the committed
`cli/kafka/pom.xml`, resolved into a cache folder outside the repository and reused), formats its
storage once, starts it on the system JDK, starts `redis-server`, creates the pipeline's topics and
waits until both answer. What `up` started is recorded in a state file so `down` stops exactly that
and nothing else; a broker or Redis that was already answering is reused.

Redis persists: an append-only file under ``{stack_dir}/redis`` fsynced every second, so a Redis
killed at any moment comes back with all but its last second of writes (the stream worker re-feeds
that gap from the Kafka offsets it stores in Redis with each fold). Its ``maxmemory`` policy is
``noeviction``: a full Redis refuses writes (the fold retries them as transient errors) instead of
silently evicting profiles, de-duplication sets or offsets. ``restart_redis`` and
``restart_kafka`` kill a component the stack started and start it again on the same data, which
is what the chaos benchmark (``bench/chaos.py``) does to them.

`recstream stack up --secure` (``RECSTREAM_STACK_SECURE``) runs the stack the way a deployment
does (``ops.access``): a random password per principal is generated once into the secrets dir
(``{stack_dir}/secrets`` unless ``RECSTREAM_SECRETS_DIR`` names one; files 0600, never printed);
Kafka takes SASL/SCRAM-SHA-512 on its loopback listener, its controller listener SASL/PLAIN as
``admin`` (the only super user), with the standard authorizer and no access where no ACL allows
it; every other principal gets its SCRAM user and ACLs; Redis loads an ACL file with the default
user off. Point services at it with ``RECSTREAM_SECRETS_DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field

from cli.supervise import Child, terminate_group
from recstream.errors import StackError
from recstream.security import (
    KAFKA_MECHANISM,
    credentials,
    ensure_secrets,
    kafka_config,
    redis_client,
)
from recstream.settings import CommonSettings, redact_url
from recstream.topics import create_topics, delete_topics

# Package data, installed with recstream, so `stack up` works outside a checkout too.
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
LOG4J_CONFIG = POM.parent / "log4j2.properties"
MIN_JAVA = 17
COMPONENTS = ("redis", "kafka")

Say = Callable[[str], None]


class StackSettings(CommonSettings):
    """Where the stack keeps its files and how long it waits (``RECSTREAM_STACK_*``)."""

    stack_dir: Path = Field(
        Path.home() / ".cache" / "recstream", description="Kafka jars, data and logs."
    )
    stack_kafka_heap: str = Field("768m", description="Broker JVM heap (-Xmx).")
    stack_start_timeout_s: float = Field(
        90.0, gt=0, description="How long `up` waits for readiness."
    )
    stack_redis_appendfsync: Literal["always", "everysec", "no"] = Field(
        "everysec",
        description="When Redis fsyncs its append-only file: everysec loses at most ~1 s of "
        "writes on a crash.",
    )
    stack_redis_maxmemory: str = Field(
        "2gb",
        pattern=r"^[0-9]+([kmg]b?)?$",
        description="Redis memory limit; when reached, writes fail (noeviction), never an evicted "
        "profile.",
    )
    stack_secure: bool = Field(
        False,
        description="Kafka with SASL/SCRAM and ACLs, Redis with ACL users and the default user "
        "off; passwords generated into the secrets dir ({stack_dir}/secrets by default).",
    )


@dataclass
class Proc:
    """A process `up` started: its pid and the log it writes."""

    name: str
    pid: int
    log: str
    address: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie (exited, not yet reaped) counts as gone.
        stat = Path(f"/proc/{self.pid}/stat")
        return not (stat.exists() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


@dataclass
class StackState:
    """The state file: which processes `up` started."""

    path: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> StackState:
        if not path.exists():
            return cls(path)
        raw = json.loads(path.read_text())
        return cls(path, {name: Proc(**p) for name, p in raw.items()})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({n: p.__dict__ for n, p in self.procs.items()}, indent=2))


class Stack:
    """Provisions, starts, stops and reports the local Kafka broker and Redis server."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.dir = self.settings.stack_dir
        self.kafka_libs = self.dir / "kafka" / "libs"
        self.kafka_data = self.dir / "kafka" / "data"
        self.redis_data = self.dir / "redis"
        self.logs = self.dir / "logs"
        self.state = StackState.load(self.dir / "stack.json")
        # Once secure, a stack dir stays secure: its broker storage holds the SCRAM users.
        self.secure = self.settings.stack_secure or (self.dir / "secure").exists()
        self.secrets = self.settings.secrets_dir or self.dir / "secrets"
        # What the stack's own clients connect with: as admin, from the secrets dir when secure.
        self.clients = (
            self.settings.model_copy(update={"secrets_dir": self.secrets})
            if self.secure
            else self.settings
        )
        # Handles of what this object spawned, so stopping them also reaps them.
        self.children: dict[str, Child] = {}

    # -- addresses -------------------------------------------------------------------------------
    @property
    def kafka_hostport(self) -> tuple[str, int]:
        first = self.settings.kafka_bootstrap.split(",")[0]
        host, _, port = first.rpartition(":")
        return host or "127.0.0.1", int(port or 9092)

    @property
    def redis_hostport(self) -> tuple[str, int]:
        url = urlparse(self.settings.redis_url.get_secret_value())
        return url.hostname or "127.0.0.1", url.port or 6379

    # -- public verbs ------------------------------------------------------------------------------
    def up(self, say: Say = print, *, only: Collection[str] = COMPONENTS) -> None:
        """Start whatever is not already answering, create the topics, wait until ready.

        ``only`` limits it to some components (a Redis alone for a test of its persistence).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.secure:
            ensure_secrets(self.secrets)
            (self.dir / "secure").touch()
            say(f"secure: SASL/SCRAM and ACLs; secrets in {self.secrets}")
        if "redis" in only:
            if self.redis_ready():
                say(f"redis: reusing {redact_url(self.settings.redis_url.get_secret_value())}")
            else:
                self._start_redis()
                say(f"redis: started on {self._fmt(self.redis_hostport)}")
        if "kafka" in only:
            if self.kafka_ready():
                say(f"kafka: reusing {self.settings.kafka_bootstrap}")
            else:
                self._start_kafka(say)
                say(f"kafka: started on {self.settings.kafka_bootstrap}")
        if "redis" in only:
            self._wait(self.redis_ready, "redis", self.state.procs.get("redis"))
        if "kafka" in only:
            self._wait(self.kafka_ready, "kafka", self.state.procs.get("kafka"))
            if self.secure:
                from ops.access import apply_kafka

                apply_kafka(self.clients)
                say("kafka: SCRAM users and ACLs applied")
            created = self.create_topics(
                self.settings.topics(),
                self.settings.topic_partitions,
                configs=self.settings.topic_configs(),  # retention, users.erased compacted
            )
            if created:
                say(f"topics: created {', '.join(created)}")
        say(f"stack ready; logs under {self.logs}")

    def down(self, say: Say = print) -> None:
        """Stop the processes `up` started (Kafka first, so it can flush), nothing else."""
        for name in ("kafka", "redis"):
            proc = self.state.procs.pop(name, None)
            if proc is None:
                continue
            if proc.alive():
                self._stop(name, proc, kill=False)
                say(f"{name}: stopped (pid {proc.pid})")
            else:
                child = self.children.pop(name, None)
                if child is not None:  # ours, exited (e.g. failed to start): reap it
                    child.stop(0)
                say(f"{name}: was not running")
        self.state.save()

    def restart_redis(self, *, kill: bool = True) -> float:
        """Stop the Redis this stack started (SIGKILL when ``kill``, as a crash would), start it
        again on its append-only file and wait until it answers; returns the seconds it took."""
        return self._restart("redis", self._start_redis, self.redis_ready, kill)

    def restart_kafka(self, *, kill: bool = True) -> float:
        """Stop the broker this stack started (SIGKILL when ``kill``), start it again on the same
        log directory and wait until it answers; returns the seconds it took."""
        return self._restart(
            "kafka", lambda: self._start_kafka(lambda _: None), self.kafka_ready, kill
        )

    def _restart(
        self, name: str, start: Callable[[], None], ready: Callable[[], bool], kill: bool
    ) -> float:
        proc = self.state.procs.get(name)
        if proc is None or not proc.alive():
            raise StackError(f"{name} was not started by this stack ({self.dir}); not restarting")
        started = time.monotonic()
        self._stop(name, proc, kill=kill)
        host, port = self.redis_hostport if name == "redis" else self.kafka_hostport
        for taken in (port,) if name == "redis" else (port, port + 1):  # + its controller
            _wait_port_free(host, taken)
        start()
        self._wait(ready, name, self.state.procs.get(name))
        return time.monotonic() - started

    def _stop(self, name: str, proc: Proc, *, kill: bool) -> None:
        """SIGKILL (a crash) or SIGTERM with a grace period (in order), and reap."""
        child = self.children.pop(name, None)
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if child is not None and child.pid == proc.pid:
            child.stop(grace_s=30.0, signalled=kill)
        else:
            terminate_group(proc.pid, grace_s=30.0)

    def status(self) -> dict[str, dict[str, object]]:
        """What runs, who started it, where it logs."""
        out: dict[str, dict[str, object]] = {}
        checks = {"kafka": self.kafka_ready, "redis": self.redis_ready}
        addresses = {
            "kafka": self.settings.kafka_bootstrap,
            "redis": redact_url(self.settings.redis_url.get_secret_value()),
        }
        for name, ready in checks.items():
            proc = self.state.procs.get(name)
            out[name] = {
                "address": addresses[name],
                "secure": self.secure,
                "ready": ready(),
                "started_by_stack": bool(proc and proc.alive()),
                "pid": proc.pid if proc else None,
                "log": proc.log if proc else str(self.logs / f"{name}.log"),
            }
        return out

    # -- readiness ---------------------------------------------------------------------------------
    def redis_ready(self) -> bool:
        import redis

        try:
            client = redis_client(self.clients, socket_connect_timeout=1.0)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def kafka_ready(self) -> bool:
        if not _port_open(*self.kafka_hostport):
            return False
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**kafka_config(self.clients), "log_level": 0})
        try:
            meta = admin.list_topics(timeout=3.0)
        except Exception:  # KafkaException or a transport error: both mean "not ready"
            return False
        return bool(meta.brokers)

    def create_topics(
        self,
        topics: list[str],
        partitions: int,
        configs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> list[str]:
        """Create the topics that do not exist yet, with ``configs`` (set on the existing ones
        too); return the names created."""
        return create_topics(self.clients, topics, partitions, configs)

    def delete_topics(self, topics: list[str]) -> None:
        """Delete ``topics`` and wait for the broker to confirm; absent ones are fine."""
        delete_topics(self.clients, topics)

    # -- starting ----------------------------------------------------------------------------
    def _start_redis(self) -> None:
        host, port = self.redis_hostport
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise StackError(
                f"Redis at {host}:{port} does not answer, and `stack up` only starts a local one"
            )
        if _port_open(host, port):
            raise StackError(f"port {port} is taken by something that is not Redis")
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(
                "redis-server not found: install it (Debian: apt-get install redis-server)"
            )
        log = self.logs / "redis.log"
        self.redis_data.mkdir(parents=True, exist_ok=True)
        if self.secure:
            from ops.access import redis_acl_file

            redis_acl_file(self.clients, self.redis_acl)
        cmd = [binary, *self.redis_args(port)]
        self.state.procs["redis"] = self._spawn("redis", cmd, log, f"{host}:{port}")

    def redis_args(self, port: int) -> list[str]:
        """redis-server's arguments: loopback only, the append-only file in the stack's dir."""
        s = self.settings
        return [
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(self.redis_data),
            "--appendonly",
            "yes",
            "--appendfsync",
            s.stack_redis_appendfsync,
            "--save",
            "",  # the AOF is the persistence; no RDB snapshots on top of it
            "--maxmemory",
            s.stack_redis_maxmemory,
            "--maxmemory-policy",
            "noeviction",
            # Freeing a replaced profile (a rebuild's switch) off the main thread.
            "--lazyfree-lazy-server-del",
            "yes",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            *(["--aclfile", str(self.redis_acl)] if self.secure else []),
        ]

    @property
    def redis_acl(self) -> Path:
        return self.redis_data / "users.acl"

    def _start_kafka(self, say: Say) -> None:
        host, port = self.kafka_hostport
        if _port_open(host, port):
            raise StackError(f"port {port} is taken by something that is not a Kafka broker")
        controller_port = port + 1
        if _port_open(host, controller_port):
            raise StackError(f"controller port {controller_port} is taken")
        java = _java()
        self._provision(say)
        props = self._write_properties(host, port, controller_port)
        classpath = f"{self.kafka_libs}/*"
        if not (self.kafka_data / "meta.properties").exists():
            cluster_id = _kafka_cluster_id()
            fmt = subprocess.run(
                [
                    java,
                    "-cp",
                    classpath,
                    f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(props),
                    "--standalone",
                    # The super user exists before the broker does; the others are added live.
                    *(
                        [
                            "--add-scram",
                            f"{KAFKA_MECHANISM}=[name=admin,password={self._admin_password()}]",
                        ]
                        if self.secure
                        else []
                    ),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise StackError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        log = self.logs / "kafka.log"
        cmd = [
            java,
            f"-Xmx{self.settings.stack_kafka_heap}",
            "-Xms256m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(props),
        ]
        self.state.procs["kafka"] = self._spawn("kafka", cmd, log, f"{host}:{port}")

    def _provision(self, say: Say) -> None:
        marker = self.kafka_libs / ".pom.sha"
        pom_id = _sha256_text(POM.read_text())
        if marker.exists() and marker.read_text() == pom_id:
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "Maven (mvn) not found: it resolves the Kafka broker from Maven Central"
            )
        say("kafka: resolving the broker from Maven Central (first run only)...")
        if self.kafka_libs.exists():
            shutil.rmtree(self.kafka_libs)
        res = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={self.kafka_libs}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise StackError(
                f"mvn could not resolve Kafka:\n{res.stdout[-4000:]}{res.stderr[-4000:]}"
            )
        # The broker's tree carries slf4j 1.7 beside the 2.x we ask for; keep only 2.x on the path.
        for jar in self.kafka_libs.glob("slf4j-api-1.*.jar"):
            jar.unlink()
        marker.write_text(pom_id)

    def _write_properties(self, host: str, port: int, controller_port: int) -> Path:
        self.kafka_data.mkdir(parents=True, exist_ok=True)
        props = self.dir / "kafka" / "server.properties"
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
            "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.kafka_data),
            "num.partitions": str(self.settings.topic_partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A restarted broker is fenced until its previous registration's session runs out
            # (9 s by default): most of a restart after a crash. One process is broker and
            # controller, so its heartbeats never cross a network.
            "broker.heartbeat.interval.ms": "750",
            "broker.session.timeout.ms": "3000",
            "auto.create.topics.enable": "true",
            "log.retention.hours": "168",
        }
        if self.secure:
            lines.update(self._secure_properties(host, port, controller_port))
        # The secure broker's properties hold the admin password: only the owner reads them.
        fd = os.open(props, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("".join(f"{k}={v}\n" for k, v in lines.items()))
        return props

    def _secure_properties(self, host: str, port: int, controller_port: int) -> dict[str, str]:
        """SASL/SCRAM for clients, SASL/PLAIN between broker and controller, both as admin;
        the standard authorizer, refusing whatever no ACL allows."""
        password = self._admin_password()
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        return {
            "listeners": f"SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"SASL_PLAINTEXT://{host}:{port}",
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "listener.security.protocol.map": (
                "CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": KAFKA_MECHANISM,
            "sasl.mechanism.inter.broker.protocol": KAFKA_MECHANISM,
            "listener.name.sasl_plaintext.sasl.enabled.mechanisms": KAFKA_MECHANISM,
            f"listener.name.sasl_plaintext.{KAFKA_MECHANISM.lower()}.sasl.jaas.config": (
                f'{scram} required username="admin" password="{password}";'
            ),
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": (
                f'{plain} required username="admin" password="{password}" user_admin="{password}";'
            ),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": "User:admin",
        }

    def _admin_password(self) -> str:
        found = credentials(self.clients, "kafka", "admin")
        if found is None:  # the secrets dir is set whenever the stack is secure
            raise StackError("no admin secret for the secure stack")
        return found.password.get_secret_value()

    def _spawn(self, name: str, cmd: list[str], log: Path, address: str) -> Proc:
        # Started as a supervised child, but outliving this command: `down` stops it by pid.
        child = Child.spawn(name, cmd, log)
        self.children[name] = child
        proc = Proc(name=name, pid=child.pid, log=str(log), address=address)
        self.state.procs[name] = proc
        self.state.save()
        return proc

    def _wait(self, ready: Callable[[], bool], name: str, proc: Proc | None) -> None:
        deadline = time.monotonic() + self.settings.stack_start_timeout_s
        delay = 0.1
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and not proc.alive():
                tail = Path(proc.log).read_text(errors="replace")[-3000:]
                raise StackError(f"{name} exited during start-up; end of {proc.log}:\n{tail}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise StackError(f"{name} not ready after {self.settings.stack_start_timeout_s:.0f}s")

    @staticmethod
    def _fmt(hostport: tuple[str, int]) -> str:
        return f"{hostport[0]}:{hostport[1]}"


def _wait_port_free(host: str, port: int, timeout_s: float = 30.0) -> None:
    """A killed server's port is free once the kernel closed its socket; wait for that."""
    deadline = time.monotonic() + timeout_s
    while _port_open(host, port):
        if time.monotonic() > deadline:
            raise StackError(f"port {port} still taken {timeout_s:.0f}s after its server stopped")
        time.sleep(0.05)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(f"java not found: Kafka 4 needs a JDK {MIN_JAVA}+ on PATH")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    try:
        quoted = out.split('"')[1]
        major = int(quoted.split(".")[0])
    except (IndexError, ValueError) as exc:
        raise StackError(f"cannot read the Java version from: {out!r}") from exc
    if major < MIN_JAVA:
        raise StackError(f"Java {major} found; Kafka 4 needs Java {MIN_JAVA} or newer")
    return java


def _kafka_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, never starting
    with ``-`` (the storage tool would read it as an option; Kafka's own ids avoid it too)."""
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
