"""Fixtures the conversation tests share: the ML-100K catalog's attributes and the rule parser
over them (one of each per test module, as before they were shared), and SmolLM2's tokenizer
(one per session: it takes seconds to read from the model file)."""

from __future__ import annotations

from typing import Any

import pytest

from inference.conversation import CatalogAttributes, RuleParser, load_tokenizer
from lab.datasets import load_dataset
from recstream.settings import CommonSettings


@pytest.fixture(scope="module")
def attributes() -> CatalogAttributes:
    """ML-100K's catalog as the conversation reads it (genres, years, titles)."""
    return CatalogAttributes(load_dataset("ml-100k", CommonSettings().data_dir).items.values())


@pytest.fixture(scope="module")
def parser(attributes: CatalogAttributes) -> RuleParser:
    return RuleParser(attributes)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return load_tokenizer()
