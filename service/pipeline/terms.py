"""The rerank score terms: one registry from which the rest follows.

    final score = retrieval_weight * retrieval_score + sum over TERMS of  <term's weight> * <term's value>

From `TERMS` follow: the mixing (`mix`, the Linker), the response fields (`types.Candidate` and
`schemas.EntityScore`: one field per term, in this order), the weights the rerank stage reads (`RerankConfig`),
the evaluation's ablation rows (`ablations`: `retrieval+ot`, `retrieval+ot+name`, ...) and the README's table
of terms (`python -m service.settings_doc --write README.md`).

Adding a term: a `Term` here, its weight in `RerankSettings` (service/settings.py: the default lives there,
with the other settings), and its value in what its `source` names (the scorer that computes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# What computes each term (one call per batch, each returning {field: [B, K] values}):
#   "cross":   the snapshot's cross scorer, chosen once per index: the student's OT-MEL cross terms
#              (rerank.student_rerank) or zero-shot OT over local features (rerank.ot_rerank)
#   "strings": service/pipeline/strings.py (string similarity of the mention and sentence with the name)
#   "kg":      service/pipeline/kg_terms.py (what the KG's facts say about the candidate)
SOURCES = ("cross", "strings", "kg")


@dataclass(frozen=True)
class Term:
    field: str  # the Candidate / EntityScore field (response JSON) that carries the value
    weight: str  # the RerankSettings field (EL_RERANK__<WEIGHT>) and RerankConfig attribute that weighs it
    source: str  # what computes it (SOURCES)
    group: str  # its evaluation group (GROUPS)
    doc: str  # what it says (README table, response schema)


# The evaluation's groups of terms, in the order its ablation rows add them: retrieval+ot, retrieval+ot+name, ...
GROUPS = ("ot", "name", "kg")

TERMS = (
    Term("rerank_score", "ot_weight", "cross", "ot",
         "OT-MEL's cross terms (g2l_text + g2l_visual) / 6: Sinkhorn plans over the mention's and the entity's "
         "token and patch features (zero-shot features: the transport-weighted cosine of OT)"),
    Term("name_score", "name_weight", "strings", "name",
         "surface-form similarity of mention and name in [0, 1] (rapidfuzz WRatio)"),
    Term("context_name_score", "context_name_weight", "strings", "name",
         "how completely the name is spelled out in the mention and its sentence, in [0, 1] "
         "(rapidfuzz token_set_ratio)"),
    Term("name_tokens_score", "name_tokens_weight", "kg", "kg",
         "1 when every token of the mention is a token of the name"),
    Term("before_birth_score", "before_birth_weight", "kg", "kg",
         "1 when the sentence is dated and every date ends before the candidate's birth (or founding) year"),
    Term("after_death_score", "after_death_weight", "kg", "kg",
         "1 when the sentence is dated and every date starts more than a year after the candidate's death year"),
    Term("description_overlap_score", "description_overlap_weight", "kg", "kg",
         "IDF mass of the sentence's other words found in the candidate's description, as 1 - exp(-mass / 10)"),
)


def fields_of(source: str) -> tuple[str, ...]:
    """The fields a source computes, in TERMS order."""
    return tuple(t.field for t in TERMS if t.source == source)


def mix(cfg: Any, retrieval: np.ndarray, values: Mapping[str, np.ndarray]) -> np.ndarray:
    """The final score [B, K]: the retrieval score and every term, each times its weight in cfg (a RerankConfig)."""
    final = cfg.retrieval_weight * retrieval
    for t in TERMS:
        final = final + getattr(cfg, t.weight) * values[t.field]
    return final


def ablations() -> dict[str, dict[str, float]]:
    """The evaluation's reranked systems, each adding one group to the last: name -> the weights it sets to 0.
    The last one zeroes nothing: it is the served score."""
    out = {}
    for i in range(1, len(GROUPS) + 1):
        kept = set(GROUPS[:i])
        name = "+".join(["retrieval", *GROUPS[:i]])
        out[name] = {t.weight: 0.0 for t in TERMS if t.group not in kept}
    return out


def render_table() -> str:
    """The README's table of score terms."""
    row_of = {g: "+".join(["retrieval", *GROUPS[: i + 1]]) for i, g in enumerate(GROUPS)}
    lines = ["| field | weight | first eval row with it | what it says |", "|---|---|---|---|"]
    lines += [f"| `{t.field}` | `EL_RERANK__{t.weight.upper()}` | `{row_of[t.group]}` | {t.doc} |" for t in TERMS]
    return "\n".join(lines)
