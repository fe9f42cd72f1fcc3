"""Plain records the KG readers return: KG entities and annotated benchmark mentions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Entity:
    """One KG entity."""

    id: str  # e.g. "Q42"
    name: str
    description: str = ""  # attribute text, e.g. "Sex: male. Birth: 1952, Cambridge. ..."
    image: Path | None = None  # an existing local file, else None
    # Lifespan (birth/death, founding/dissolution), when the KG states it; None: read from the description.
    start_year: int | None = None
    end_year: int | None = None


@dataclass(frozen=True, slots=True)
class Mention:
    """One annotated mention of a benchmark split."""

    id: str  # unique within a dataset split, e.g. "wikimel:21717:0"
    mention: str  # surface form
    context: str  # the sentence
    image: Path | None  # existing local image file of the mention, else None
    answer: str  # gold entity id (QID)
    answer_name: str  # gold entity name as annotated
