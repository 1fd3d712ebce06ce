"""Folding rules on the pure-Python reference: weights, decay, duplicates, late events."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recstream.keys import USER_KINDS, Keys
from schemas import ClickEvent, DwellEvent, ViewEvent
from streams.fold import (
    Folded,
    FoldParams,
    Weights,
    group_by_user,
    group_positioned,
    pending_notice,
    reference_fold,
    script_args,
)

H = 100.0
PARAMS = FoldParams(half_life_s=H, recent_max=3, retention_s=1000.0)
CATS = {"a": ["Action"], "b": ["Action", "Drama"]}


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def view(eid: str, item: str, t: float) -> ViewEvent:
    return ViewEvent(event_id=eid, type="view", user_id="u", item_id=item, ts=at(t))


def click(eid: str, item: str, t: float) -> ClickEvent:
    return ClickEvent(event_id=eid, type="click", user_id="u", item_id=item, ts=at(t))


def dwell(eid: str, item: str, t: float, ms: int) -> DwellEvent:
    return DwellEvent(event_id=eid, type="dwell", user_id="u", item_id=item, ts=at(t), dwell_ms=ms)


def test_weights_by_type_and_dwell_time() -> None:
    w = Weights(view=1.0, click=2.0, dwell_max=4.0, dwell_cap_ms=120_000)
    assert w.of(view("1", "a", 0)) == 1.0
    assert w.of(click("2", "a", 0)) == 2.0
    assert w.of(dwell("3", "a", 0, 0)) == 0.0
    assert w.of(dwell("4", "a", 0, 30_000)) == 1.0
    assert w.of(dwell("5", "a", 0, 120_000)) == 4.0
    assert w.of(dwell("6", "a", 0, 10 * 120_000)) == 4.0


def test_decay_by_hand() -> None:
    # click on a at t=0, view on b at t=100 (one half-life later): T = 100.
    p = reference_fold([[click("1", "a", 0), view("2", "b", 100)]], CATS, Weights(), PARAMS)
    assert p.reference_ts == 100
    assert p.item_weights == pytest.approx({"a": 2 * 0.5, "b": 1.0})
    # a is all Action (1.0); b splits 1.0 over Action and Drama.
    assert p.category_affinities == pytest.approx({"Action": 1.0 + 0.5, "Drama": 0.5})
    assert p.version == 1
    assert p.event_count == 2
    assert p.recent_items(3) == ["b", "a"]


def test_late_event_contributes_its_decayed_weight() -> None:
    # The same events, the old one arriving last in a later batch: same profile.
    p = reference_fold([[view("2", "b", 100)], [click("1", "a", 0)]], CATS, Weights(), PARAMS)
    assert p.item_weights == pytest.approx({"a": 1.0, "b": 1.0})
    assert p.version == 2
    assert p.recent_items(3) == ["b", "a"]


def test_duplicates_change_nothing() -> None:
    first: list[ClickEvent | ViewEvent] = [click("1", "a", 0), view("2", "b", 100)]
    p = reference_fold([first, first, [click("1", "a", 0)]], CATS, Weights(), PARAMS)
    assert p.event_count == 2
    assert p.duplicates == 3
    assert p.version == 1
    assert p.item_weights == pytest.approx({"a": 1.0, "b": 1.0})


def test_events_older_than_retention_are_too_late() -> None:
    p = reference_fold([[view("1", "a", 5000)], [view("2", "b", 3999)]], CATS, Weights(), PARAMS)
    assert p.late == 1
    assert p.event_count == 1
    assert "b" not in p.item_weights


def test_recent_items_are_bounded_newest_first_and_distinct() -> None:
    batch = [
        view(str(n), item, t)
        for n, (item, t) in enumerate([("a", 1), ("b", 2), ("c", 3), ("a", 4), ("d", 5)])
    ]
    p = reference_fold([batch], {}, Weights(), PARAMS)
    assert p.recent_items(PARAMS.recent_max) == ["d", "a", "c"]


events_strategy = st.lists(
    st.tuples(
        st.sampled_from(["view", "click", "dwell"]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=0, max_value=900),
        st.integers(min_value=0, max_value=200_000),
    ),
    min_size=1,
    max_size=20,
)


def build(spec: list[tuple[str, str, int, int]]) -> list[ViewEvent | ClickEvent | DwellEvent]:
    out: list[ViewEvent | ClickEvent | DwellEvent] = []
    for n, (kind, item, t, ms) in enumerate(spec):
        if kind == "view":
            out.append(view(f"e{n}", item, t))
        elif kind == "click":
            out.append(click(f"e{n}", item, t))
        else:
            out.append(dwell(f"e{n}", item, t, ms))
    return out


@settings(max_examples=150)
@given(spec=events_strategy, data=st.data())
def test_fold_is_order_and_batching_independent(
    spec: list[tuple[str, str, int, int]], data: st.DataObject
) -> None:
    events = build(spec)
    shuffled = data.draw(st.permutations(events))
    cut = data.draw(st.integers(min_value=0, max_value=len(events)))
    one = reference_fold([events], CATS, Weights(), PARAMS)
    two = reference_fold([shuffled[:cut], shuffled[cut:]], CATS, Weights(), PARAMS)
    assert two.item_weights == pytest.approx(one.item_weights)
    assert two.category_affinities == pytest.approx(one.category_affinities)
    assert two.event_count == one.event_count == len(events)
    # Total weight equals the decayed sum computed directly.
    newest = max(t for _, _, t, _ in spec)
    expected = sum(Weights().of(e) * 2 ** (-(newest - e.ts.timestamp()) / H) for e in events)
    assert math.isclose(sum(one.item_weights.values()), expected, rel_tol=1e-9)


def test_group_by_user_keeps_arrival_order() -> None:
    rows = [("u1", "e1", "a", 1.0, 1.0), ("u2", "e2", "b", 2.0, 1.0), ("u1", "e3", "c", 0.5, 2.0)]
    groups = group_by_user(rows)
    assert list(groups) == ["u1", "u2"]
    assert groups["u1"] == [("e1", "a", 1.0, 1.0), ("e3", "c", 0.5, 2.0)]


def test_script_args_layout() -> None:
    params = FoldParams(
        half_life_s=10.0, recent_max=5, retention_s=20.0, rebase_after_s=30.0, shift_threshold=0.1
    )
    groups = {"u": [("e1", "a", 1.5, 2.0)], "v:x": [("e2", "b:c", 1.0, 1.0)]}
    args = script_args(Keys("p:"), params, groups)
    assert args[:6] == ["p:", "10.0", "5", "20.0", "30.0", "0.1"]
    # Each user travels with its key base and each item with its key, built by Keys: the
    # script never builds a key from a raw id.
    assert orjson.loads(args[6]) == [
        ["u", "p:u:{u}:", [["e1", "a", 1.5, 2.0]]],
        ["v:x", "p:u:{v%3Ax}:", [["e2", "b:c", 1.0, 1.0]]],
    ]
    assert orjson.loads(args[7]) == {"a": "p:item:a", "b:c": "p:item:b%3Ac"}
    defaults = FoldParams()
    assert args[8:] == [
        str(defaults.seen_max),
        str(defaults.items_max),
        str(defaults.categories_max),
        str(defaults.idle_ttl_s),
        "",  # no recent-popularity counts unless asked (the live worker does)
        "0",
    ]
    counting = script_args(Keys("p:"), FoldParams(trending_ttl_s=86_400), groups)
    assert counting[12:] == ["p:streams:trend:", "86400"]


def test_folded_decodes_script_rows() -> None:
    row = [b"u", 3, 2, 1, 0, 1, b"0.25", b"e9", b"1700000000.5", 4, b"a", b"b"]
    folded = Folded.from_row(row)
    assert folded == Folded("u", 3, 2, 1, 0, True, 0.25, "e9", 1700000000.5, ("a", "b"), erased=4)
    assert not folded.rejected


def test_pending_notices_stored_before_the_erased_count_still_decode() -> None:
    old = orjson.dumps([3, 17, "u", 3, 2, 1, 0, 1, "0.25", "e9", "1700000000.5", "a", "b"])
    new = orjson.dumps([3, 17, "u", 3, 2, 1, 0, 1, "0.25", "e9", "1700000000.5", 0, "a", "b"])
    bare = orjson.dumps([3, None, "u", 3, 2, 1, 0, 1, "0.25", "e9", "1700000000.5"])
    assert pending_notice(old) == pending_notice(new)
    assert pending_notice(old)[1].new_items == ("a", "b")
    assert pending_notice(bare) == (
        None,
        Folded("u", 3, 2, 1, 0, True, 0.25, "e9", 1700000000.5, ()),
    )


def test_positioned_groups_carry_offsets_and_the_partition_of_each_user() -> None:
    rows = [
        ("u", "e1", "a", 1.0, 2.0, "t:0", 5),
        ("v", "e2", "b", 1.0, 1.0, "t:1", 6),
        ("u", "e3", "c", 2.0, 1.0, "t:0", 9),
        ("u", "e4", "d", 3.0, 1.0, "t:2", 1),  # another partition: no offset to compare
    ]
    groups, fields = group_positioned(rows)
    assert fields == {"u": "t:0", "v": "t:1"}
    assert groups["u"] == [
        ("e1", "a", 1.0, 2.0, 5),
        ("e3", "c", 2.0, 1.0, 9),
        ("e4", "d", 3.0, 1.0),
    ]
    args = script_args(Keys("p:"), FoldParams(), groups, fields)
    assert orjson.loads(args[6])[1] == ["v", "p:u:{v}:", [["e2", "b", 1.0, 1.0, 6]], "t:1"]


def test_folded_decodes_a_refused_user() -> None:
    row = [b"u", -1, 0, 0, 0, 0, b"0", b"WRONGTYPE", b"0", 0]
    assert Folded.from_row(row) == Folded.refused("u", "WRONGTYPE")
    assert Folded.from_row(row).rejected == "WRONGTYPE"


# -- key layout: ids are escaped and hash-tagged, so no id reaches another user's keys --------

HOSTILE_IDS = [
    "bob",
    "bob:recent",
    "bob:items",
    "bob:profile",
    "bob}",
    "{bob}",
    "a}{b",
    "%41",
    "A",
    "x\u2028y",
    "u:{bob}:seen",
    "ü" * 64,
    "\U0001f600" * 64,
]


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum of the Redis Cluster spec (written out, not imported)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_slot(key: str) -> int:
    """The cluster slot of ``key``: CRC16 of its hash tag (first non-empty {...}) mod 16384."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16_xmodem(raw) % 16384


def test_crc16_matches_the_spec_example() -> None:
    # The Redis Cluster spec: CRC16 of "123456789" is 0x31C3.
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert hash_slot("{user1000}.following") == hash_slot("{user1000}.followers")


@pytest.mark.parametrize("prefix", ["", "app:", "app:ns:r1:"])
def test_hostile_ids_never_reach_another_users_keys(prefix: str) -> None:
    keys = Keys(prefix)
    owner: dict[str, str] = {}
    for user in HOSTILE_IDS:
        mine = keys.user_keys(user)
        assert len(set(mine)) == len(USER_KINDS)
        # One slot per user: a script or transaction over a user's keys is cluster-valid.
        assert len({hash_slot(k) for k in mine}) == 1
        for key in mine:
            assert key not in owner, (user, owner.get(key))
            owner[key] = user
            assert keys.user_of(key) == user
    for key, user in owner.items():
        for other_key, other in owner.items():
            if user != other:
                # Neither equal nor a prefix: a SCAN of one user's keys never lists another's.
                assert not other_key.startswith(key)
    assert keys.profile("bob") == f"{prefix}u:{{bob}}:profile"
    assert keys.recs("bob") == f"{prefix}u:{{bob}}:recs"


@given(st.text(min_size=1, max_size=64))
def test_any_id_escapes_reversibly_into_one_tag(user: str) -> None:
    keys = Keys("p:")
    try:
        user.encode()
    except UnicodeEncodeError:
        return  # lone surrogates: the JSON parser refuses them before any key is built
    base = keys.user_base(user)
    tag = base[len("p:u:{") : -2]
    assert base == f"p:u:{{{tag}}}:"
    assert set(tag) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.~-%")
    assert keys.user_of(keys.seen(user)) == user
    assert keys.item(user).startswith("p:item:") and ":" not in keys.item(user)[7:]


def test_user_pattern_matches_only_this_prefix() -> None:
    live, side = Keys("app:"), Keys("app:").namespace("r1")
    assert live.user_pattern("seen") == "app:u:{*}:seen"
    assert not side.seen("u").startswith("app:u:")
    assert Keys("a*b:").user_pattern("seen") == "a\\*b:u:{*}:seen"
    with pytest.raises(ValueError, match="kind"):
        live.user_pattern("nope")
    with pytest.raises(ValueError, match="prefix"):
        Keys("{x}:")
