"""The demo's live board keeps the newest list per user, bounded, and counts fallbacks."""

from __future__ import annotations

from cli.demo import Board


def _msg(user: str, version: int, source: str = "model") -> dict[str, object]:
    return {"user_id": user, "profile_version": version, "source": source, "items": []}


def test_board_keeps_newest_per_user_and_moves_updated_users_to_the_top() -> None:
    board = Board(rows=3)
    for user, version in (("a", 1), ("b", 1), ("c", 1), ("a", 2)):
        board.update(_msg(user, version))
    assert list(board.latest) == ["b", "c", "a"]
    assert board.latest["a"]["profile_version"] == 2
    assert board.received == 4


def test_board_is_bounded_and_counts_fallbacks() -> None:
    board = Board(rows=2)
    board.update(_msg("a", 1, "fallback"))
    board.update(_msg("b", 1))
    board.update(_msg("c", 1, "fallback"))
    assert list(board.latest) == ["b", "c"]
    assert board.fallbacks == 2


def test_the_board_names_the_reasons_of_each_lists_first_item() -> None:
    from cli.demo import top_reasons

    reasons = [{"item_id": "1", "title": "Toy Story (1995)"}, {"item_id": "7", "title": ""}]
    message = {**_msg("a", 1), "items": [{"item_id": "3", "score": 1.0, "because": reasons}]}
    assert top_reasons(message) == "Toy Story (1995); 7"  # an id where the title is unknown
    assert top_reasons(_msg("a", 1)) == ""  # an empty list
    assert top_reasons({**_msg("a", 1), "items": [{"item_id": "3", "score": 1.0}]}) == ""
