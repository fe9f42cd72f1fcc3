"""Facts read from an entity's attribute text, for the reranker's KG-consistency terms.

The MEL KBs describe entities as Wikidata attributes: "Sex: male. Birth: 1881, London. Death: 1964,
Chilton. Occupation: ...". A KG in JSONL may state the years itself (`start_year`, `end_year`); otherwise
they are read from such a description, so indexes built before the fields existed get them too.
"""

from __future__ import annotations

import re

_START = re.compile(r"(?:^|[.;]\s*)Birth: (-?\d{1,4})\b")
_END = re.compile(r"(?:^|[.;]\s*)Death: (-?\d{1,4})\b")


def lifespan_from_description(description: str) -> tuple[int | None, int | None]:
    """(birth year, death year) from Wikidata-style attribute text; None for what it does not state."""
    start, end = _START.search(description or ""), _END.search(description or "")
    return (int(start.group(1)) if start else None, int(end.group(1)) if end else None)


def lifespan(start_year: int | None, end_year: int | None, description: str) -> tuple[int | None, int | None]:
    """The stated years when the KG gives either, else those of the description."""
    if start_year is not None or end_year is not None:
        return start_year, end_year
    return lifespan_from_description(description)
