"""Commands of the operator tools: ``recstream catalog load``, ``recstream replay-dataset``,
``recstream replay profiles | regen | compare``, ``recstream users erase | export`` and
``recstream access secrets | redis-acl | kafka``.

Settings options are generated from :class:`ops.settings.OpsSettings` (recstream.options) and
fall back to their environment variables; heavy modules (Faust, torch) are imported inside the
commands.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ops.settings import OpsSettings
from recstream.options import given, settings_options

__all__ = ["register"]


def _settings(**overrides: Any) -> OpsSettings:
    """OpsSettings from the environment, with the flags that were given on top."""
    return OpsSettings(**given(overrides))


def _rfc3339(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"not an RFC 3339 time: {value!r}") from exc
    if parsed.tzinfo is None:
        raise click.BadParameter("give a UTC offset, e.g. 2026-01-01T00:00:00Z")
    return parsed


_progress_option = click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Progress bar with ETA."
)


@click.group("catalog")
def catalog() -> None:
    """Item metadata in Redis."""


@catalog.command("load")
@click.option(
    "--dataset", required=True, help="ml-100k, ml-latest-small, or a folder in the generic format."
)
def catalog_load(dataset: str) -> None:
    """Load item titles, categories and years into Redis `item:{id}` hashes, and item
    popularity (interaction counts) into `catalog:popular`, the read API's fallback."""
    from lab.datasets import load_dataset
    from ops.catalog import load_catalog
    from recstream.keys import Keys
    from recstream.security import redis_client

    settings = _settings()
    data = load_dataset(dataset, settings.data_dir)
    client = redis_client(settings)
    try:
        count = load_catalog(client, Keys(settings.key_prefix), data)
    finally:
        client.close()
    click.echo(f"loaded {count} items of {data.name}")


def _rate(text: str) -> float | None:
    if text == "max":
        return None
    value = float(text)
    if value <= 0:
        raise click.BadParameter("must be > 0 or 'max'")
    return value


@click.command("replay-dataset")
@click.option(
    "--dataset", required=True, help="ml-100k, ml-latest-small, or a folder in the generic format."
)
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option(
    "--rate",
    default="max",
    show_default=True,
    help="Events per second, or 'max' for as fast as Kafka takes them.",
)
@click.option("--topic", help="Target topic (default: the configured clickstream).")
def replay_dataset(dataset: str, limit: int | None, rate: str, topic: str | None) -> None:
    """Produce a dataset's interactions to `clickstream` in time order.

    Each rating becomes a view, a click and a dwell of rating x 24 s, stamped with the rating's
    time; event ids are deterministic, so a second run is a replay that changes no profile.
    """
    from tqdm import tqdm

    from lab.datasets import load_dataset
    from ops.feed import count_events, produce, replay_records

    pace = _rate(rate)
    settings = _settings(topic_clickstream=topic)
    data = load_dataset(dataset, settings.data_dir)
    total = count_events(data, limit)
    with tqdm(total=total, unit="ev", desc=f"replay {data.name}") as bar:
        sent = produce(
            settings,
            settings.topic_clickstream,
            replay_records(data, limit),
            rate=pace,
            progress=bar.update,
        )
    click.echo(f"produced {sent} events to {settings.topic_clickstream}")


@click.group("replay")
def replay() -> None:
    """Replay topic history: rebuild profiles, re-run regeneration, compare model outputs."""


@replay.command("profiles")
@click.option("--from-beginning", is_flag=True, help="Read the topic from its first offset.")
@click.option(
    "--from-time",
    callback=_rfc3339,
    metavar="RFC3339",
    help="Read from the first record at or after this time (offsets-for-times).",
)
@click.option(
    "--namespace",
    help="Name of the rebuild's Redis namespace ({prefix}ns:NAME:). Give an existing one to "
    "resume or switch it. [default: rebuild-<UTC time>]",
)
@click.option("--switch", is_flag=True, help="When rebuilt, switch readers to it atomically.")
@click.option(
    "--drop", is_flag=True, help="Delete the --namespace (an abandoned rebuild) and exit."
)
@click.option(
    "--dry-run", is_flag=True, help="Print partitions, offsets and counts; write nothing."
)
@settings_options(
    OpsSettings, only=("replay_batch_size",), flags={"replay_batch_size": "--batch-size"}
)
@click.option("--topic", help="Clickstream topic to read (default: the configured clickstream).")
@_progress_option
def replay_profiles(
    *,
    from_beginning: bool,
    from_time: datetime | None,
    namespace: str | None,
    switch: bool,
    drop: bool,
    dry_run: bool,
    topic: str | None,
    progress: bool,
    **flags: Any,
) -> None:
    """Rebuild every profile from the clickstream's history into a fresh Redis namespace.

    Folds with the live agent's own code and settings (RECSTREAM_PROFILE_*, RECSTREAM_WEIGHT_*)
    up to the end offsets captured at the start. Safe to interrupt: offsets are checkpointed in
    the namespace and a second run with the same --namespace resumes. With --switch the rebuilt
    profiles replace the live ones in one atomic Redis script and events that arrived meanwhile
    are folded in afterwards. A live profile absent from the rebuild is deleted only when the
    rebuild could have seen its events: a profile whose newest event is older than the first
    record the rebuild read (history lost to retention, or before --from-time) is kept.
    """
    from ops.rebuild import ProfileRebuild

    if from_beginning and from_time is not None:
        raise click.UsageError("--from-beginning and --from-time exclude each other")
    if drop and (namespace is None or switch or dry_run):
        raise click.UsageError("--drop needs --namespace and no --switch or --dry-run")
    settings = _settings(**flags)
    name = namespace or f"rebuild-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    with ProfileRebuild(settings, name, topic=topic, progress=progress) as rebuild:
        if drop:
            click.echo(f"deleted {rebuild.drop()} keys of namespace {name!r}")
            return
        plan = rebuild.plan(since=from_time, from_beginning=from_beginning)
        for line in plan.describe():
            click.echo(line)
        if dry_run:
            live = len(rebuild.live_users())
            if plan.phase in ("new", "folding"):
                click.echo(
                    f"would copy the catalog into {plan.prefix!r} and fold {plan.left} records "
                    "there, checkpointing offsets after each batch"
                )
            if switch:
                click.echo(
                    f"would then switch: the rebuilt profiles replace the live ones under "
                    f"{settings.key_prefix!r} ({live} live profiles now; those absent from the "
                    "rebuild are deleted unless their newest event is older than what the "
                    "rebuild read) and the records that arrived meanwhile are folded in"
                )
            click.echo("dry run: nothing was written")
            return
        if plan.phase in ("new", "folding"):
            click.echo(f"resume after an interruption with: --namespace {name}")
            try:
                stats = rebuild.run(plan)
            except KeyboardInterrupt:
                click.echo(
                    f"\ninterrupted; offsets are checkpointed, resume with --namespace {name}"
                )
                sys.exit(130)
            click.echo(f"rebuilt: {stats.describe()}")
            plan = rebuild.plan()
        if not switch:
            click.echo(
                f"profiles are in {plan.prefix!r}; switch readers to them with: "
                f"recstream replay profiles --namespace {name} --switch"
            )
            return
        result = rebuild.switch(plan)
        click.echo(
            f"switched {result.switched} profiles live in {result.script_s * 1000:.1f} ms "
            f"({result.versions_bumped} versions raised "
            f"above the old live ones); of the live profiles absent from the rebuild, removed "
            f"{result.removed} and kept {result.kept} (newest event older than the history the "
            f"rebuild read); tail: {result.tail.describe()}"
        )


@replay.command("regen")
@click.option(
    "--from-time",
    callback=_rfc3339,
    required=True,
    metavar="RFC3339",
    help="Start of the range (publish time of the profile changes, inclusive).",
)
@click.option(
    "--to-time",
    callback=_rfc3339,
    required=True,
    metavar="RFC3339",
    help="End of the range (exclusive).",
)
@click.option(
    "--artifact",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model folder written by `recstream train`. Without it the co-occurrence model of "
    "--dataset is used.",
)
@click.option("--out-topic", required=True, help="Topic for the replayed lists (created if new).")
@click.option(
    "--live-topic", help="Live lists to compare with (default: the configured recommendations)."
)
@settings_options(
    OpsSettings,
    only=("replay_dataset", "replay_k", "replay_regen_batch_size"),
    flags={
        "replay_dataset": "--dataset",
        "replay_k": "--k",
        "replay_regen_batch_size": "--batch-size",
    },
)
@click.option("--dry-run", is_flag=True, help="List what would be regenerated; write nothing.")
@_progress_option
def replay_regen(
    *,
    from_time: datetime,
    to_time: datetime,
    artifact: Path | None,
    out_topic: str,
    live_topic: str | None,
    dry_run: bool,
    progress: bool,
    **flags: Any,
) -> None:
    """Re-run regeneration for the users whose profiles changed in a time range, then compare.

    Users come from `profiles.changed` between --from-time and --to-time; each is regenerated
    from their current profile with another model into --out-topic, and the output is compared
    with the latest live list per user: overlap@k, Kendall tau-b over the union of the two
    top-k lists, and how many users' top-k changed.
    """
    from ops.regen import RegenReplay, changed_users, compare_topics

    settings = _settings(**flags)
    live = live_topic or settings.topic_recommendations
    if out_topic == live:
        raise click.UsageError("--out-topic must differ from the live topic")
    assert from_time is not None and to_time is not None
    changes = changed_users(settings, from_time, to_time, progress=progress)
    click.echo(
        f"{len(changes)} users changed between {from_time.isoformat()} and {to_time.isoformat()}"
    )
    model_desc = str(artifact) if artifact else f"co-occurrence model of {settings.replay_dataset}"
    if dry_run:
        click.echo(
            f"would regenerate them with {model_desc} in batches of "
            f"{settings.replay_regen_batch_size}, publish to {out_topic!r} and compare with "
            f"{live!r}; dry run: nothing was written"
        )
        return
    if not changes:
        return
    from inference import Recommender
    from inference.worker import ArtifactLoader
    from lab.cooccurrence import fit_cooccurrence
    from recstream.topics import create_topics
    from schemas import ModelRef

    create_topics(settings, [out_topic], settings.topic_partitions)
    click.echo(f"loading {model_desc}")
    recommender: Recommender = (
        ArtifactLoader(artifact)()
        if artifact
        else fit_cooccurrence(settings.replay_dataset, settings.data_dir)
    )
    model = ModelRef(
        name=str(getattr(recommender, "name", "model")),
        version=str(getattr(recommender, "version", "unknown")),
    )
    stats = RegenReplay(settings, recommender, model, progress=progress).run(changes, out_topic)
    click.echo(
        f"published {stats.published} lists to {out_topic!r} "
        f"({stats.missing_profiles} users without a profile skipped)"
    )
    comparison = compare_topics(settings, live, out_topic, set(changes), progress=progress)
    for line in comparison.describe(live, out_topic):
        click.echo(line)


@replay.command("compare")
@click.option("--topic", "topics", multiple=True, required=True, help="Give exactly two.")
@settings_options(OpsSettings, only=("replay_k",), flags={"replay_k": "--k"})
@_progress_option
def replay_compare(topics: tuple[str, ...], progress: bool, **flags: Any) -> None:
    """Compare the latest list per user on two recommendation topics.

    Prints overlap@k (mean), Kendall tau-b over the union of the two top-k lists (mean; an item
    missing from a list ranks k+1 there) and how many users' top-k differ.
    """
    from ops.regen import compare_topics

    if len(topics) != 2:
        raise click.UsageError("give --topic exactly twice")
    settings = _settings(**flags)
    comparison = compare_topics(settings, topics[0], topics[1], progress=progress)
    for line in comparison.describe(topics[0], topics[1]):
        click.echo(line)


@click.group("users")
def users() -> None:
    """One user's data: erase it (GDPR art. 17) or export it (art. 15)."""


@users.command("erase")
@click.argument("user_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def users_erase(user_id: str, yes: bool) -> None:
    """Erase every key of USER_ID in every namespace and record it on `users.erased`.

    The stream worker and every rebuild then skip the user's older events; events after the
    erasure start a new profile. Runs as the `eraser` principal. Erasing twice is harmless.
    Prints what was removed, as JSON.
    """
    from streams.erasure import Eraser

    if not yes:
        click.confirm(f"erase every stored key of user {user_id!r}?", abort=True, err=True)
    with Eraser(_settings()) as eraser:
        receipt = eraser.erase(user_id).receipt()
    click.echo(receipt.model_dump_json(indent=2))


@users.command("export")
@click.argument("user_id")
def users_export(user_id: str) -> None:
    """Print everything stored about USER_ID in the live namespace, as JSON (profile, items,
    categories, recent items, seen event ids, cached list, privacy ledger, erasure marker,
    pending change notices)."""
    from streams.erasure import Eraser

    with Eraser(_settings()) as eraser:
        data = eraser.export(user_id)
    click.echo(data.model_dump_json(indent=2))


@click.group("access")
def access() -> None:
    """Credentials and rights of each principal on Kafka and Redis (docs/security.md)."""


@access.command("secrets")
@click.argument("folder", type=click.Path(path_type=Path))
def access_secrets(folder: Path) -> None:
    """Generate a random Kafka and Redis password for every principal under FOLDER
    (kafka/<principal>, redis/<principal>, mode 0600); existing ones are kept, none is printed."""
    from recstream.security import PRINCIPALS, ensure_secrets

    ensure_secrets(folder)
    click.echo(f"secrets of {len(PRINCIPALS)} principals in {folder} (not printed)")


@access.command("redis-acl")
@click.argument("out", type=click.Path(path_type=Path))
def access_redis_acl(out: Path) -> None:
    """Write Redis's ACL file to OUT: the default user off, one user per principal with its
    key patterns and commands, passwords (from RECSTREAM_SECRETS_DIR) only as SHA-256 digests."""
    from ops.access import redis_acl_file

    redis_acl_file(_settings(), out)
    click.echo(f"wrote {out}")


@access.command("kafka")
@click.option("--create-topics", is_flag=True, help="Also create the pipeline's topics.")
def access_kafka(create_topics: bool) -> None:
    """As admin: give every principal its SCRAM user (passwords from RECSTREAM_SECRETS_DIR) and
    exactly its ACLs; with --create-topics, create the missing pipeline topics first (with the
    retention and compaction `stack up` sets)."""
    from ops.access import apply_kafka
    from recstream.topics import create_topics as create

    settings = _settings()
    if create_topics:
        created = create(
            settings, settings.topics(), settings.topic_partitions, settings.topic_configs()
        )
        click.echo(f"topics: created {', '.join(created) or 'none'}")
    apply_kafka(settings)
    click.echo("kafka: SCRAM users and ACLs applied")


def register(main: click.Group, serve: click.Group) -> None:
    """Attach the operator commands to the project CLI (no services to serve)."""
    for command in (catalog, replay_dataset, replay, users, access):
        main.add_command(command)
