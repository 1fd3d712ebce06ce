"""Erasure's pure parts: the key pattern that finds one user's keys, the record, topic configs."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recstream.keys import Keys, escape
from recstream.settings import CommonSettings
from schemas import UserErased
from streams.erasure import erase_user
from streams.exceptions import ErasureFailed


def redis_glob(pattern: str) -> re.Pattern[str]:
    """Redis's MATCH rules (``*``, ``?``, ``\\`` escapes) as a regular expression; a character
    class would be a pattern built from unescaped data, so it fails the test."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        assert c not in "[]", f"unescaped {c!r} in {pattern!r}"
        out.append({"*": ".*", "?": "."}.get(c, re.escape(c)))
        i += 1
    return re.compile("".join(out), re.DOTALL)


IDS = st.text(
    alphabet=st.sampled_from([*"ab:*?[]{}\\%-_. ", "\u2028", "é"]), min_size=1, max_size=6
)


@given(IDS, IDS, st.sampled_from(["", "p:", "a*[x]:"]))
def test_one_users_pattern_matches_all_its_keys_and_no_one_elses(
    user: str, other: str, prefix: str
) -> None:
    keys = Keys(prefix)
    pattern = redis_glob(keys.user_match_nested(user))
    mine = [*keys.user_keys(user), keys.privacy_ledger(user), keys.erased(user)]
    nested = keys.namespace("rebuild-1")
    mine += [nested.profile(user), nested.seen(user), nested.erased(user)]
    assert all(pattern.fullmatch(k) for k in mine)
    if other != user:
        theirs = [*keys.user_keys(other), keys.erased(other), nested.profile(other)]
        assert not any(pattern.fullmatch(k) for k in theirs)
    # Nor any key that is not a user's.
    assert not pattern.fullmatch(keys.stream_offsets("g"))
    assert not pattern.fullmatch(keys.item(user))


def test_the_marker_is_not_a_kind_the_fold_expires() -> None:
    keys = Keys("p:")
    assert keys.erased("u:1") == "p:u:{u%3A1}:erased"
    assert keys.erased("u:1") not in keys.user_keys("u:1")
    assert escape("*?[]{}\\") == "%2A%3F%5B%5D%7B%7D%5C"


def test_the_record_gives_the_fold_its_partition_fields() -> None:
    record = UserErased(user_id="u", erased_at_ms=5, topic="clicks", watermarks={0: 7, 3: 0})
    assert record.fields() == {"clicks:0": 7, "clicks:3": 0}
    assert UserErased.model_validate_json(record.model_dump_json()) == record


def test_topic_configs_compact_the_erasures_and_bound_everything_else() -> None:
    settings = CommonSettings(topic_dlq_retention_ms=1000)
    configs = settings.topic_configs()
    assert set(configs) == set(settings.topics())
    assert configs[settings.topic_users_erased]["cleanup.policy"] == "compact"
    retention = {t: int(c["retention.ms"]) for t, c in configs.items()}
    assert retention[settings.topic_dlq] == 1000
    assert retention[settings.topic_users_erased] == -1
    others = set(settings.topics()) - {settings.topic_users_erased}
    assert all(0 < retention[t] <= retention[settings.topic_clickstream] for t in others)


def test_an_id_no_event_can_carry_is_refused_before_anything_happens() -> None:
    for bad in ("", "x" * 65, "a\nb"):
        with pytest.raises(ErasureFailed, match="1-64 characters"):
            # No client is touched: a refused id never reaches Kafka or Redis.
            erase_user(
                None,  # type: ignore[arg-type]  # never used
                None,  # type: ignore[arg-type]  # never used
                {},
                user_id=bad,
                prefix="",
                clickstream="c",
                erased_topic="e",
            )
