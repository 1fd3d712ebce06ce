"""Conversational refinement, measured: understanding, satisfaction, personalisation, latency.

On ML-100K with a trained artifact and the labelled requests of ``bench/data/refinements.jsonl``
(written by hand: natural wordings, each with the constraints a person reads from it):

- **understanding**: the share of requests whose parsed constraints equal the label exactly
  (genres, exclusions, year bounds, ``like`` title, reset), and per field;
- **satisfaction@10**: for each request with hard constraints and each sampled user whose unseen
  items hold at least ten that meet the *labelled* constraints, the share of the refined top 10
  (refined with the *parsed* constraints) that meets every labelled constraint;
- **personalisation**: NDCG@10 of the user's held-out test item (leave-one-out), over the pairs
  of (request, user) whose test item meets the labelled constraints: the unrefined model's
  ranking restricted to the items that meet them, against the refined list;
- **latency** of a refinement turn: ``ConversationEngine.turn`` (parse, rank every item, refine,
  explain, trim) in process, and the whole HTTP turn on the real API and Redis (``--http``); for
  an artifact that blends recent popularity, also turns of the users' first 1-3 items with the
  counts of the dataset's last days (the blend, and the second ranking ``popular`` needs).

Each parser is a row, beside ``oracle``: the labelled constraints themselves, which shows what
refining costs independent of understanding. ``rules``; with ``--lm`` also ``lm`` (SmolLM2 by
constrained decoding), ``lm-empty`` (the model only where the rules understood nothing) and
``lm-fill`` (the model for each field the rules left empty); the model's answer to each message
is computed once, and each row is timed as if it had parsed itself. ``--like-variants`` compares
ways of serving "more like <title>" (``LIKE_VARIANTS``): the held-out item's NDCG@10 and the
list's mean MiniLM cosine to the film.

    RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=~/.cache/recstream/artifact-keys/artifact-signing.pub \
        python -m bench.conversation --artifact artifacts/ml-100k --users 200 --http
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import percentile
from inference.conversation import LIKE_RULE, CatalogAttributes, LikeRule, Parsed, refine
from lab.like_rules import SERVED, LikeVariant
from schemas.conversation import Constraints

LABELS = Path(__file__).parent / "data" / "refinements.jsonl"
FIELDS = ("genres", "exclude_genres", "year_min", "year_max", "like", "reset")


@dataclass
class Label:
    message: str
    parsed: Parsed  # the labelled reading


def read_labels(path: Path, attributes: CatalogAttributes) -> list[Label]:
    out = []
    for line in path.read_text("utf-8").splitlines():
        row = json.loads(line)
        like = []
        for title in row["like"]:
            item = attributes.exact_title(title)
            if item is None:
                raise SystemExit(f"labelled title {title!r} is not in the catalog")
            like.append(item)
        constraints = Constraints(
            genres=tuple(row["genres"]),
            exclude_genres=tuple(row["exclude_genres"]),
            year_min=row["year_min"],
            year_max=row["year_max"],
            like=tuple(like),
        )
        out.append(Label(row["message"], Parsed(bool(row["reset"]), constraints)))
    return out


def _fields(p: Parsed) -> dict[str, Any]:
    c = p.constraints
    return {
        "genres": frozenset(c.genres),
        "exclude_genres": frozenset(c.exclude_genres),
        "year_min": c.year_min,
        "year_max": c.year_max,
        "like": frozenset(c.like),
        "reset": p.reset,
    }


@dataclass
class Row:
    name: str
    exact: int = 0
    per_field: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0))
    satisfaction: list[float] = field(default_factory=list)
    ndcg_unrefined: list[float] = field(default_factory=list)
    ndcg_refined: list[float] = field(default_factory=list)
    ndcg_like: list[tuple[float, float]] = field(default_factory=list)  # requests with "like"
    # Mean MiniLM cosine of the top 10 to the "like" item: unrefined (within the constraints)
    # and refined, what the reordering buys.
    like_cosine: list[tuple[float, float]] = field(default_factory=list)
    parse_ms: list[float] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)


def _ndcg(position: int | None) -> float:
    return 0.0 if position is None or position >= 10 else 1.0 / float(np.log2(position + 2))


@dataclass
class Users:
    """The sampled test users: the model's ranking of every unseen item, and the held-out item."""

    attributes: CatalogAttributes
    ranked: Sequence[list[tuple[str, float]]]
    targets: Sequence[str]
    vectors: Callable[[Sequence[str]], np.ndarray]
    like_rule: LikeRule


class Once:
    """A parser whose answer to each message is computed once and reused by every row that
    asks; :meth:`owed` is the time a reused answer would have taken, so each row is timed as if
    it had parsed itself."""

    def __init__(self, parse: Callable[[str], Parsed]) -> None:
        self.parse = parse
        self.answers: dict[str, tuple[Parsed, float]] = {}
        self._owed = 0.0

    def __call__(self, message: str) -> Parsed:
        if message not in self.answers:
            started = time.perf_counter()
            parsed = self.parse(message)
            self.answers[message] = parsed, (time.perf_counter() - started) * 1000
            return parsed
        parsed, ms = self.answers[message]
        self._owed += ms
        return parsed

    def owed(self) -> float:
        owed, self._owed = self._owed, 0.0
        return owed


def evaluate(
    name: str,
    parse: Callable[[str], Parsed],
    labels: Sequence[Label],
    users: Users,
    reused: Once | None = None,
) -> Row:
    row = Row(name)
    attributes = users.attributes
    for label in labels:
        started = time.perf_counter()
        parsed = parse(label.message)
        owed = reused.owed() if reused is not None else 0.0
        row.parse_ms.append((time.perf_counter() - started) * 1000 + owed)
        got, want = _fields(parsed), _fields(label.parsed)
        for f in FIELDS:
            row.per_field[f] += got[f] == want[f]
        if got == want:
            row.exact += 1
        else:
            row.misses.append(label.message)
        gold = label.parsed.constraints
        gold_mask = attributes.mask(gold)
        for user_ranked, target in zip(users.ranked, users.targets, strict=True):
            listed = refine(
                user_ranked,
                parsed.constraints,
                attributes,
                10,
                users.vectors,
                like_rule=users.like_rule,
            )
            ids = [i for i, _ in listed]
            if gold.like:
                anchor = users.vectors(list(gold.like)).mean(axis=0)
                plain = [
                    i
                    for i, _ in user_ranked
                    if gold_mask[attributes.position[i]] and i not in gold.like
                ][:10]
                if plain and ids:
                    row.like_cosine.append(
                        (
                            float((users.vectors(plain) @ anchor).mean()),
                            float((users.vectors(ids) @ anchor).mean()),
                        )
                    )
            if gold.hard:
                meeting = [i for i, _ in user_ranked if gold_mask[attributes.position[i]]]
                if len(meeting) >= 10:
                    row.satisfaction.append(
                        float(np.mean([gold_mask[attributes.position[i]] for i in ids]))
                        if ids
                        else 0.0
                    )
            pos = attributes.position.get(target)
            if pos is None or not gold_mask[pos] or target in gold.like:
                continue
            subset = [i for i, _ in user_ranked if gold_mask[attributes.position[i]]]
            unrefined = _ndcg(subset.index(target) if target in subset else None)
            refined = _ndcg(ids.index(target) if target in ids else None)
            row.ndcg_unrefined.append(unrefined)
            row.ndcg_refined.append(refined)
            if gold.like:
                row.ndcg_like.append((unrefined, refined))
    return row


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def report(rows: Sequence[Row], n_labels: int) -> None:
    """Print understanding per field, then satisfaction, NDCG and parse time per parser."""
    print(f"\n{n_labels} labelled requests: share understood exactly, and per field")
    print("parser   exact " + " ".join(f"{f:>14}" for f in FIELDS))
    for r in rows:
        per_field = " ".join(f"{r.per_field[f] / n_labels:14.3f}" for f in FIELDS)
        print(f"{r.name:<8} {r.exact / n_labels:5.3f} {per_field}")
    print(
        "\nparser   satisfaction@10 (pairs) | NDCG@10 unrefined-in-subset / refined (pairs)"
        " | of which 'like' requests | cosine to 'like' before / after | parse p50 / p99 ms"
    )
    for r in rows:
        like_un = _mean([u for u, _ in r.ndcg_like])
        like_re = _mean([v for _, v in r.ndcg_like])
        cos_before = _mean([a for a, _ in r.like_cosine])
        cos_after = _mean([b for _, b in r.like_cosine])
        print(
            f"{r.name:<8} {_mean(r.satisfaction):.4f} ({len(r.satisfaction)}) | "
            f"{_mean(r.ndcg_unrefined):.4f} / {_mean(r.ndcg_refined):.4f} "
            f"({len(r.ndcg_refined)}) | {like_un:.4f} / {like_re:.4f} ({len(r.ndcg_like)}) | "
            f"{cos_before:.3f} / {cos_after:.3f} | "
            f"{percentile(r.parse_ms, 0.5):.2f} / {percentile(r.parse_ms, 0.99):.2f}"
        )


def reasons_faithfulness(
    engine: Any, histories: Sequence[list[str]], seed: int
) -> dict[str, list[tuple[int, int]]]:
    """How far each of a user's top 10 items falls in the model's ranking when one history item
    is removed: its first reason (occlusion), the history item most like it in MiniLM space
    (a text explanation), or a random one of the items occlusion tried."""
    from inference.reasons import MAX_OCCLUDED, occlusion_reasons

    rng = np.random.default_rng(seed)
    drops: dict[str, list[tuple[int, int]]] = {"occlusion": [], "text": [], "random": []}
    for history in histories:
        items = [i for i, _ in engine.ranked(history)[:10]]
        reasons = occlusion_reasons(engine.recommender, history, items)
        window = list(dict.fromkeys(reversed(history)))[:MAX_OCCLUDED]
        vectors = engine.vectors(window)
        for item in items:
            if not reasons[item]:
                continue
            text = window[int(np.argmax(vectors @ engine.vectors([item])[0]))]
            others = [h for h in window if h not in reasons[item]]
            picks = {"occlusion": reasons[item][0], "text": text}
            if others:
                picks["random"] = others[int(rng.integers(len(others)))]
            before = [i for i, _ in engine.ranked(history)].index(item)
            for name, removed in picks.items():
                after = [i for i, _ in engine.ranked([h for h in history if h != removed])]
                drops[name].append((before, after.index(item)))
    return drops


def _kept(
    ranked: list[tuple[str, float]],
    mask: np.ndarray,
    attributes: CatalogAttributes,
    like: Sequence[str],
) -> list[str]:
    """The first ten of ``ranked`` that ``mask`` keeps, the ``like`` items left out."""
    return [i for i, _ in ranked if mask[attributes.position[i]] and i not in like][:10]


LIKE_VARIANTS = (
    LikeVariant(weight=0.1),
    LikeVariant(weight=0.25),
    LikeVariant(weight=0.5),
    LikeVariant(near=0.5),
    LikeVariant(near=0.25),
    LikeVariant(shared_genre=True),
    LikeVariant(weight=0.1, model_order=True),
    LikeVariant(weight=0.15, model_order=True),
    LikeVariant(weight=0.25, model_order=True),
    LikeVariant(weight=0.5, model_order=True),
    LikeVariant(weight=0.2, model_order=True),
    LikeVariant(weight=0.25, keep=5, model_order=True),
    LikeVariant(weight=0.5, keep=5, model_order=True),
    LikeVariant(weight=0.5, keep=7, model_order=True),
    LikeVariant(weight=1.0, keep=5, model_order=True),
    LikeVariant(weight=1.0, keep=7, model_order=True),
    LikeVariant(weight=1.0, keep=5, pool=20, model_order=True),
    LikeVariant(weight=2.0, keep=5, pool=40, model_order=True),
)
"""The ways of serving "more like <title>" that ``--like-variants`` compares."""


def like_variants(
    engine: Any,
    labels: Sequence[Label],
    users: Users,
    histories: Sequence[list[str]],
    append: bool,
) -> None:
    """Ways to serve "more like <title>" on the labelled "like" requests: NDCG@10 of the
    held-out item (pairs whose item meets the labelled constraints) and the top 10's mean
    MiniLM cosine to the named film, for each rule of ``LIKE_VARIANTS``. ``append`` also ranks
    with the film added to the history (the model's own notion of what follows it)."""
    attributes = users.attributes
    ndcg: dict[str, list[float]] = {}
    cosine: dict[str, list[float]] = {}
    for label in labels:
        gold = label.parsed.constraints
        if not gold.like:
            continue
        mask = attributes.mask(gold)
        anchor = users.vectors(list(gold.like)).mean(axis=0)
        for history, target, ranked in zip(histories, users.targets, users.ranked, strict=True):
            lists = {"unrefined": _kept(ranked, mask, attributes, gold.like)}
            for rule in LIKE_VARIANTS:
                refined = refine(ranked, gold, attributes, 10, users.vectors, like_rule=rule)
                lists[rule.name] = [i for i, _ in refined]
            if append:
                appended = engine.ranked([*history, *gold.like])
                lists["append"] = _kept(appended, mask, attributes, gold.like)
            for name, listed in lists.items():
                cosine.setdefault(name, []).append(float((users.vectors(listed) @ anchor).mean()))
                pos = attributes.position.get(target)
                if pos is not None and mask[pos]:
                    found = listed.index(target) if target in listed else None
                    ndcg.setdefault(name, []).append(_ndcg(found))
    print("\n'like' requests: NDCG@10 of the held-out item (pairs) / mean cosine to the film")
    for name, values in ndcg.items():
        served = " (served)" if name == SERVED.name else ""
        print(
            f"  {name:<28} {_mean(values):.4f} ({len(values)}) / {_mean(cosine[name]):.3f}{served}"
        )


def engine_latency(
    engine: Any,
    histories: Sequence[list[str]],
    labels: Sequence[Label],
    n: int,
    recent: dict[str, int] | None = None,
) -> list[float]:
    """Milliseconds per ``ConversationEngine.turn`` (every step of a turn but Redis), with the
    recent-popularity counts ``recent`` when given."""
    from datetime import UTC, datetime

    out = []
    previous = None
    for t in range(n):
        message = labels[t % len(labels)].message
        started = time.perf_counter()
        result = engine.turn(
            list(histories[t % len(histories)]),
            previous,
            message,
            10,
            datetime.now(UTC),
            recent=recent,
        )
        out.append((time.perf_counter() - started) * 1000)
        previous = result.session if t % 4 else None  # follow-ups and new sessions
    return out


def latest_counts(dataset: Any, days: int) -> dict[str, int]:
    """Users per item in the dataset's last ``days`` whole days, as the stream worker counts."""
    from streams.trending import DAY_S, day_of

    last = max(it.ts for it in dataset.interactions)
    since = (day_of(last) - days + 1) * DAY_S
    pairs = {(it.user_id, it.item_id) for it in dataset.interactions if it.ts >= since}
    counts: dict[str, int] = {}
    for _, item in pairs:
        counts[item] = counts.get(item, 0) + 1
    return counts


def http_latency(
    artifact: Path, histories: Sequence[list[str]], labels: Sequence[Label], n: int
) -> list[float]:
    """Milliseconds per ``POST /v1/users/{id}/conversation`` on the real API and Redis,
    measured by the client (sequential requests; sessions of four turns)."""
    import tempfile

    from aiohttp import ClientSession, web

    from api.app import SERVER_OPTIONS, build_app
    from api.keys import add_key, new_key
    from api.settings import ApiSettings
    from lab.datasets import load_dataset
    from ops.catalog import load_catalog
    from recstream.keys import Keys
    from recstream.security import async_redis_client, redis_client
    from schemas.api import Scope
    from streams.fold import FoldParams, FoldScript

    keys_file = Path(tempfile.mkdtemp(prefix="bench-conv-")) / "keys"
    key, record = new_key([Scope.CONVERSE], "bench")
    add_key(keys_file, record)
    settings = ApiSettings(
        key_prefix=f"bench:conv-{uuid.uuid4().hex[:8]}:",
        api_conversation_model_dir=artifact,
        api_keys_file=keys_file,
    )
    client = redis_client(settings)
    load_catalog(client, Keys(settings.key_prefix), load_dataset("ml-100k", settings.data_dir))
    users = [f"bench-{u}" for u in range(min(len(histories), 50))]

    async def run() -> list[float]:
        store = async_redis_client(settings)
        script = FoldScript(store, settings.key_prefix, FoldParams())
        for u, user in enumerate(users):
            events = [
                (f"e{u}-{n}", item, 1e9 + n, 2.0) for n, item in enumerate(histories[u][-50:])
            ]
            await script.run({user: events})
        await store.aclose()
        runner = web.AppRunner(build_app(settings), **SERVER_OPTIONS)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # bound
        out = []
        session_ids: dict[str, str] = {}
        try:
            async with ClientSession() as http:
                for t in range(n):
                    user = users[(t // 4) % len(users)]
                    body: dict[str, Any] = {"message": labels[t % len(labels)].message}
                    if t % 4 and user in session_ids:
                        body["session_id"] = session_ids[user]
                    url = f"http://127.0.0.1:{port}/v1/users/{user}/conversation"
                    started = time.perf_counter()
                    async with http.post(url, json=body, headers={"X-API-Key": key}) as resp:
                        answer = await resp.json()
                    out.append((time.perf_counter() - started) * 1000)
                    assert resp.status == 200, answer
                    session_ids[user] = answer["session_id"]
        finally:
            await runner.cleanup()
        return out

    try:
        return asyncio.run(run())
    finally:
        for key in client.scan_iter(match=settings.key_prefix + "*"):
            client.delete(key)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--users", type=int, default=200, help="sampled test users (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm", action="store_true", help="also measure the language-model parser")
    parser.add_argument("--lm-int8", action="store_true", help="the language model in INT8")
    parser.add_argument(
        "--lm-calibrate",
        action="store_true",
        help="subtract the language model's answer to a content-free message at each choice",
    )
    parser.add_argument("--limit", type=int, default=0, help="only the first N requests (0 = all)")
    parser.add_argument("--turns", type=int, default=200, help="turns timed for latency")
    parser.add_argument(
        "--http", action="store_true", help="also time turns over HTTP (needs Redis)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-misses", action="store_true")
    parser.add_argument("--latency-only", action="store_true", help="skip the labelled sets")
    parser.add_argument("--like-variants", action="store_true", help="compare ways to serve 'like'")
    parser.add_argument(
        "--faithfulness", type=int, default=0, help="users for the reasons' deletion test"
    )
    parser.add_argument(
        "--like-append", action="store_true", help="with --like-variants: rank with the film added"
    )
    args = parser.parse_args()

    import torch

    from api.conversation import ConversationEngine
    from lab.datasets import load_dataset
    from lab.protocol import leave_one_out
    from recstream.settings import CommonSettings

    torch.set_num_threads(args.threads)
    dataset = load_dataset("ml-100k", CommonSettings().data_dir)
    split = leave_one_out(dataset)
    started = time.perf_counter()
    engine = ConversationEngine.load(args.artifact, CatalogAttributes(dataset.items.values()))
    print(f"engine loaded in {time.perf_counter() - started:.1f} s ({engine.model.name})")
    attributes = engine.attributes
    labels = read_labels(args.labels, attributes)
    if args.limit:
        labels = labels[: args.limit]

    rng = np.random.default_rng(args.seed)
    users = split.eval_users
    if args.users and args.users < len(users):
        rows = np.sort(rng.choice(len(users), args.users, replace=False))
    else:
        rows = np.arange(len(users))
    test_histories = split.histories("test")
    targets_idx = split.targets("test")
    histories = [[split.item_ids[i] for i in test_histories[r]] for r in rows]
    targets = [split.item_ids[int(targets_idx[r])] for r in rows]
    started = time.perf_counter()
    ranked = [engine.ranked(h) for h in histories]
    print(f"{len(rows)} users ranked in {time.perf_counter() - started:.1f} s")

    parsers: list[tuple[str, Callable[[str], Parsed]]] = [
        ("oracle", {lab.message: lab.parsed for lab in labels}.__getitem__),
        ("rules", engine.parser.parse),
    ]
    lm = None
    if args.lm:
        from lab.lm_parser import LMParser, combine
        from lab.reranker import LLMReranker, RerankerConfig

        loaded = LLMReranker(RerankerConfig(quantize_int8=args.lm_int8))
        lm = Once(
            LMParser(
                loaded.model, loaded.tokenizer, engine.parser, calibrate=args.lm_calibrate
            ).parse
        )
        rules = engine.parser.parse
        parsers += [
            ("lm", lm),
            ("lm-empty", lambda m: combine(rules(m), lambda: lm(m), "empty")),
            ("lm-fill", lambda m: combine(rules(m), lambda: lm(m), "fill")),
        ]
    # The index's vectors, read once: the bench compares lists many times over.
    matrix = engine.vectors(attributes.item_ids)

    def vectors(items: Sequence[str]) -> np.ndarray:
        return matrix[[attributes.position[i] for i in items]]

    sample = Users(attributes, ranked, targets, vectors, LIKE_RULE)
    results = []
    for name, parse in [] if args.latency_only else parsers:
        started = time.perf_counter()
        results.append(evaluate(name, parse, labels, sample, lm))
        print(f"{name}: evaluated in {time.perf_counter() - started:.1f} s")
    if results:
        report(results, len(labels))
    if args.show_misses:
        for r in results[1:]:
            print(f"\n{r.name} misses:")
            for message in r.misses:
                print(f"  {message}")

    if args.like_variants:
        like_variants(engine, labels, sample, histories, args.like_append)
    if args.faithfulness:
        drops = reasons_faithfulness(engine, histories[: args.faithfulness], args.seed)
        print(
            f"\nreasons, deletion test ({args.faithfulness} users' top 10): rank fall of the item "
            "when one history item is removed, mean / median / share falling out of the top 10"
        )
        for name, pairs in drops.items():
            ranks = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
            fell = ranks[:, 1] - ranks[:, 0]
            print(
                f"  {name:<9} {fell.mean():8.1f} / {np.median(fell):6.1f} / "
                f"{float(np.mean(ranks[:, 1] >= 10)):.3f}  ({len(pairs)} items)"
            )

    turns = engine_latency(engine, histories, labels, args.turns)
    print(
        f"\nturn in process (parse, rank, refine, reasons, trim), {len(turns)} turns: "
        f"p50 {percentile(turns, 0.5):.1f} ms, p99 {percentile(turns, 0.99):.1f} ms"
    )
    if engine.recent_days:
        newcomers = [h[: 1 + t % 3] for t, h in enumerate(histories)]
        counts = latest_counts(dataset, engine.recent_days)
        turns = engine_latency(engine, newcomers, labels, args.turns, counts)
        print(
            f"turn in process, histories of 1-3 items with recent popularity ({len(counts)} items "
            f"counted in the dataset's last {engine.recent_days} days), {len(turns)} turns: "
            f"p50 {percentile(turns, 0.5):.1f} ms, p99 {percentile(turns, 0.99):.1f} ms"
        )
    if args.http:
        timed = http_latency(args.artifact, histories, labels, args.turns)
        print(
            f"turn over HTTP (real API and Redis), {len(timed)} turns: "
            f"p50 {percentile(timed, 0.5):.1f} ms, p99 {percentile(timed, 0.99):.1f} ms"
        )


if __name__ == "__main__":
    main()
