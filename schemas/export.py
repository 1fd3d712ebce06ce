"""Export the contracts for producers, consumers and frontends in other languages.

``python -m schemas.export`` rewrites ``schemas/json/*.json``: a JSON Schema file per message and
the read API's OpenAPI document (``openapi.json``); ``--check`` exits non-zero when the committed
files differ from the models (CI and the unit tests use it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.embeddings import ProfileEmbedding
from schemas.erasure import UserErased
from schemas.events import Event
from schemas.messages import Profile, ProfileChanged, Recommendations
from schemas.openapi import openapi_document

JSON_DIR = Path(__file__).resolve().parent / "json"


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema document, for every public contract."""
    docs: dict[str, dict[str, Any]] = {
        "clickstream-event.json": TypeAdapter(Event).json_schema(),
        "profile-changed.json": ProfileChanged.model_json_schema(),
        "recommendations.json": Recommendations.model_json_schema(),
        "profile.json": Profile.model_json_schema(),
        "profile-embedding.json": ProfileEmbedding.model_json_schema(),
        "user-erased.json": UserErased.model_json_schema(),
    }
    for name, doc in docs.items():
        doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        doc["$id"] = f"https://recstream.local/schemas/{name}"
        doc.setdefault("title", name.removesuffix(".json"))
    return docs


def documents() -> dict[str, dict[str, Any]]:
    """File name -> document, for every file ``schemas/json`` holds."""
    return {**schemas(), "openapi.json": openapi_document()}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def orphans(directory: Path = JSON_DIR) -> list[str]:
    """Names of JSON files in ``directory`` that no model generates: contracts nobody maintains."""
    return sorted(path.name for path in directory.glob("*.json") if path.name not in documents())


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Names of files in ``directory`` that are missing or differ from the models, then orphans."""
    return [
        name
        for name, doc in documents().items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != render(doc)
    ] + orphans(directory)


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in documents().items():
        path = directory / name
        path.write_text(render(doc), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__)
    parser.add_argument("--check", action="store_true", help="Fail if committed files are stale.")
    parser.add_argument("--dir", type=Path, default=JSON_DIR, help="Output folder.")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date, unowned = stale(args.dir), orphans(args.dir)
        for name in out_of_date:
            hint = "no model generates it: delete it" if name in unowned else "run export"
            print(f"stale: {args.dir / name} ({hint})", file=sys.stderr)
        return 1 if out_of_date else 0
    for path in export(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
