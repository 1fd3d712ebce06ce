"""Who may do what: each principal's Kafka ACLs and Redis ACL rules, and applying them.

One table (:func:`rights`) says, per principal of :data:`recstream.security.PRINCIPALS`, which
topics it reads and writes, which consumer groups it joins, and which Redis keys and commands it
may use; names come from the settings (topics, groups, the key prefix) and Redis patterns from
:class:`recstream.keys.Keys`' real layout. `recstream stack up --secure` and the compose file's
``access`` step apply it: SCRAM users and ACLs on Kafka (:func:`apply_kafka`), an ACL file for
Redis (:func:`redis_acl_file`) in which the default user is off. ``admin`` is Kafka's super user
and may run every Redis command; ``api`` has no Kafka right at all.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumers.settings import CacheWriterSettings, EmbeddingsSettings, RegenSettings
from ops.exceptions import OpsError
from recstream.security import KAFKA_MECHANISM, PRINCIPALS, credentials, kafka_config
from recstream.settings import CommonSettings
from schemas.conversation import SESSION_KIND
from streams.settings import StreamsSettings

__all__ = ["Rights", "apply_kafka", "redis_acl_file", "rights"]

# Commands every non-admin Redis user may run on its keys: reads, writes and scripts (EVALSHA,
# SCRIPT LOAD; Redis checks each key a script touches against the caller's patterns), never
# the dangerous ones (KEYS, FLUSHALL, CONFIG, DEBUG, ...) nor flushing or killing scripts.
_READ = "+@read +@transaction +@connection -@dangerous"
# Reads, and writes where a key pattern allows them, but no key-space commands (DEL, EXPIRE,
# RENAME, ...): the regeneration service only adds to and takes from its schedule.
_SCHEDULE = (
    "+@read +@write -@keyspace +@scripting +@transaction +@connection -@dangerous "
    "-script|flush -script|kill"
)
_WRITE = (
    "+@read +@write +@keyspace +@scripting +@transaction +@connection -@dangerous "
    "-script|flush -script|kill"
)


@dataclass(frozen=True, slots=True)
class Rights:
    """What one principal may do."""

    principal: str
    reads: tuple[str, ...] = ()
    """Topics it consumes."""
    writes: tuple[str, ...] = ()
    """Topics it produces to."""
    groups: tuple[str, ...] = ()
    """Consumer groups it joins."""
    owns_prefix: str = ""
    """Topics and groups under this prefix are its own (Faust's internal ones); empty: none."""
    redis: str = ""
    """Redis ACL rules (keys, then commands); empty: no Redis user."""


def rights(settings: CommonSettings) -> list[Rights]:
    """Every principal's rights for the topics, groups and key prefix of ``settings``; the
    services' group ids are read from their own settings (the environment they run in)."""
    s = settings
    streams, regen = StreamsSettings(), RegenSettings()
    cache, embeddings = CacheWriterSettings(), EmbeddingsSettings()
    p = _glob_escape(s.key_prefix)
    user = f"{p}u:{{*}}:"
    catalog = f"%R~{p}catalog:* %R~{p}item:*"  # the catalog's attributes, read-only

    def keys(kinds: Iterable[str], *, read_only: bool = False) -> str:
        mark = "%R~" if read_only else "~"
        return " ".join(f"{mark}{user}{kind}" for kind in kinds)

    profile = ("profile", "items", "cats", "recent")
    return [
        Rights("admin", redis="~* &* +@all"),
        Rights(
            "streams",
            reads=(s.topic_clickstream, s.topic_users_erased),
            writes=(s.topic_dlq, s.topic_profiles_changed),
            groups=(streams.streams_app_id,),
            owns_prefix=f"{streams.streams_app_id}-",
            redis=f"{keys((*profile, 'seen'))} {keys(['erased'], read_only=True)} "
            f"~{p}streams:* {_WRITE}",
        ),
        Rights(
            "regen",
            reads=(s.topic_profiles_changed,),
            writes=(s.topic_recommendations, s.topic_profiles_changed_dlq),
            groups=(regen.regen_group_id,),
            # The user's conversation session too, and the catalog's attributes: a session's
            # constraints steer the regenerated list; the stream worker's recent-popularity
            # counts (no user in them), blended into short histories' lists. The one key it
            # writes: the schedule of returning users' lists (consumers.returning).
            redis=f"{keys((*profile, SESSION_KIND), read_only=True)} {catalog} "
            f"%R~{p}streams:trend:* ~{p}regen:returning {_SCHEDULE}",
        ),
        Rights(
            "cache",
            reads=(s.topic_recommendations,),
            writes=(s.topic_recommendations_dlq,),
            groups=(cache.cache_group_id,),
            # Redis checks the keys named to a script as read-write: the compare-and-set names
            # the profile key (it reads its version), so that pattern cannot be read-only.
            redis=f"{keys(['recs', 'profile'])} {_WRITE}",
        ),
        Rights(
            "embeddings",
            reads=(s.topic_profiles_changed,),
            writes=(s.topic_profile_embeddings,),
            groups=(embeddings.embeddings_group_id,),
            redis=f"{keys(profile, read_only=True)} {keys(['privacy'])} {_WRITE}",
        ),
        Rights("producer", writes=(s.topic_clickstream,)),
        Rights(
            "api",
            redis=f"{keys(['recs'], read_only=True)} %R~{p}catalog:popular "
            "+@read +@connection -@dangerous",
        ),
        # The read API's conversation turns (api.conversation): the catalog's attributes, the
        # user's profile and the recent-popularity counts (no user in them) to read, the user's
        # session to read and write, and a change notice for the version it read (the
        # regeneration service refuses a version ahead of the stored one), so the refined list
        # is published; nothing else.
        Rights(
            "converse",
            writes=(s.topic_profiles_changed,),
            redis=f"{keys(profile, read_only=True)} {keys([SESSION_KIND])} "
            f"{catalog} %R~{p}streams:trend:* +@read +@write +@connection -@dangerous",
        ),
        # Erasure (streams.erasure) reads the clickstream's end offsets, records the erasure,
        # deletes a user's keys under any prefix (live, rebuild namespaces) and removes the
        # user's pending change notices; export reads the same keys.
        Rights(
            "eraser",
            reads=(s.topic_clickstream,),
            writes=(s.topic_users_erased,),
            redis=f"~*u:{{*}}:* ~{p}streams:*:pending:* ~{p}regen:returning {_WRITE}",
        ),
    ]


def redis_acl_file(settings: CommonSettings, path: Path) -> None:
    """Write Redis's ACL file (mode 0600): the default user off, one user per principal with
    Redis rights, its password from ``settings`` (the secrets dir) stored only as a SHA-256."""
    lines = ["user default off resetkeys resetchannels -@all"]
    for right in rights(settings):
        if not right.redis:
            continue
        found = credentials(settings, "redis", right.principal)
        if found is None:
            raise OpsError("Redis ACL users need a secrets dir (RECSTREAM_SECRETS_DIR)")
        digest = hashlib.sha256(found.password.get_secret_value().encode()).hexdigest()
        lines.append(f"user {right.principal} on #{digest} resetchannels {right.redis}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{line}\n" for line in lines))


def apply_kafka(settings: CommonSettings, timeout_s: float = 30.0) -> None:
    """As ``admin``: give every other principal its SCRAM credentials (from the secrets dir)
    and exactly its ACLs (bindings the table no longer names are removed)."""
    from confluent_kafka.admin import (
        AclBinding,
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialAlteration,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient(kafka_config(settings, "admin"))
    upserts: list[UserScramCredentialAlteration] = []
    for principal in PRINCIPALS:
        if principal == "admin":
            continue  # made when the broker's storage was formatted
        found = credentials(settings, "kafka", principal)
        if found is None:
            raise OpsError("Kafka SCRAM users need a secrets dir (RECSTREAM_SECRETS_DIR)")
        upserts.append(
            UserScramCredentialUpsertion(
                principal,
                ScramCredentialInfo(ScramMechanism[KAFKA_MECHANISM.replace("-", "_")], 8192),
                found.password.get_secret_value().encode(),
            )
        )
    _wait_all(admin.alter_user_scram_credentials(upserts), timeout_s, "SCRAM users")

    def allow(kind: ResourceType, name: str, pattern: ResourcePatternType, principal: str,
              operation: AclOperation) -> AclBinding:  # fmt: skip
        return AclBinding(
            kind, name, pattern, f"User:{principal}", "*", operation, AclPermissionType.ALLOW
        )

    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    wanted: list[AclBinding] = []
    for r in rights(settings):
        who = r.principal
        if who == "admin":
            continue  # super.users
        wanted += [allow(ResourceType.TOPIC, t, literal, who, AclOperation.READ) for t in r.reads]
        wanted += [allow(ResourceType.TOPIC, t, literal, who, AclOperation.WRITE) for t in r.writes]
        wanted += [allow(ResourceType.GROUP, g, literal, who, AclOperation.READ) for g in r.groups]
        if r.owns_prefix:
            for kind in (ResourceType.TOPIC, ResourceType.GROUP):
                wanted.append(allow(kind, r.owns_prefix, prefixed, who, AclOperation.ALL))
    # None matches any name, principal and host (the stubs say str).
    everything = AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None,  # type: ignore[arg-type]
        AclOperation.ANY, AclPermissionType.ANY,
    )  # fmt: skip
    existing = admin.describe_acls(everything).result(timeout=timeout_s)
    stale = [AclBindingFilter(*_fields(b)) for b in existing if b not in wanted]
    if stale:
        _wait_all(admin.delete_acls(stale), timeout_s, "removing ACLs")
    _wait_all(admin.create_acls(wanted), timeout_s, "ACLs")
    # The controller has the change; the broker's authorizer applies it from the metadata log a
    # moment later. Return once the broker shows exactly the table's ACLs, so they are in force.
    deadline = time.monotonic() + timeout_s
    while set(admin.describe_acls(everything).result(timeout=timeout_s)) != set(wanted):
        if time.monotonic() > deadline:
            raise OpsError(f"the broker did not show the applied ACLs within {timeout_s:g}s")
        time.sleep(0.05)


def _fields(binding: Any) -> tuple[Any, ...]:
    """An ACL binding's fields in the order both AclBinding and AclBindingFilter take them."""
    b = binding
    return (
        b.restype,
        b.name,
        b.resource_pattern_type,
        b.principal,
        b.host,
        b.operation,
        b.permission_type,
    )


def _wait_all(futures: Mapping[Any, Future[Any]], timeout_s: float, what: str) -> None:
    for key, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:  # KafkaException or a timeout: both fail the step
            raise OpsError(f"{what}: {key}: {exc}") from exc


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
