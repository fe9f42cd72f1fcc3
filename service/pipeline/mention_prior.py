"""What annotated mentions say a surface form usually names: a prior for the NIL verdict.

Built from the benchmarks' train splits (`el fit-calibration`), shipped beside the calibration
(models/weights/calibration.prior.json: `prior_path`): for each surface form (lower-cased, spaces collapsed), the entities its
training mentions were linked to, most frequent first. When the entity a form usually names is not in the KB, the
mention most likely has no answer there: on WikiDiverse dev under the NIL protocol, 123 of the 327 mentions whose
entity was removed had a form whose most frequent training entity was that entity, against 5 of the 1,329 mentions
that kept theirs (classic linkers read anchor-text dictionaries the same way). The same table also says how often
the served top entity was linked at all (under any form): a namesake that no training mention ever meant is a
weaker answer than a much-linked entity (the entity prior of classic linkers; on WikiDiverse dev it took NIL F1 from
0.778 to 0.811 in sample). The answerable model reads four features from it (`features`); a KB whose ids the prior
does not share (`applies`) gets none of them, as a mention whose form the prior never saw.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Three more (the top entity's share of the form's mentions, their number, none of the form's entities present)
# gave the same NIL F1 in sample and no better cross-fitted (2026-12-05): left out. "prior_top_links" (log of 1 +
# the training mentions linked to the served top, counted over the KEEP entities kept per form) came later: last.
PRIOR_FEATURES = ("prior_known", "prior_top_absent", "prior_agrees", "prior_top_links")
KEEP = 3  # entities kept per form
MIN_COVERAGE = 0.5  # share of the entities the prior's forms usually name that a KB must hold for it to apply


def prior_path(calibration: Path) -> Path:
    """Where the prior of a calibration JSON lives: beside it, `<name>.prior.json`."""
    return calibration.with_name(f"{calibration.stem}.prior.json")


def surface_form(mention: str) -> str:
    return " ".join(mention.lower().split())


class MentionPrior:
    def __init__(self, table: Mapping[str, list[tuple[str, int]]], sources: list[str] | None = None) -> None:
        self.table = dict(table)  # form -> [(entity id, training mentions)], most frequent first
        self.sources = sources or []
        self._applies: dict[str, bool] = {}  # index base version -> applies

    @classmethod
    def from_mentions(cls, pairs: Iterable[tuple[str, str]], sources: list[str] | None = None) -> MentionPrior:
        """From (mention text, gold entity id) pairs of annotated training mentions."""
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for mention, entity in pairs:
            if form := surface_form(mention):
                counts[form][entity] += 1
        return cls({f: c.most_common(KEEP) for f, c in counts.items()}, sources)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sources": self.sources, "keep": KEEP,
                                    "forms": {f: [list(e) for e in v] for f, v in sorted(self.table.items())}},
                                   separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> MentionPrior:
        raw = json.loads(Path(path).read_text())
        return cls({f: [(str(e), int(n)) for e, n in v] for f, v in raw["forms"].items()}, raw.get("sources"))

    def applies(self, version: str, present: Callable[[str], bool], kb_size: int) -> bool:
        """Whether "missing from this KB" means anything: the KB holds at least MIN_COVERAGE of the entities the
        prior's forms usually name. A broad KB (the benchmarks', Wikidata) does; a domain slice does not (there a
        text's "Paris" may well be the one Paris it holds while the usual Paris is missing: on a 459-entity slice
        of the benchmark KB the prior turned 4 of 24 right answers into NIL), nor does a KB with ids of its own.
        Decided once per base index (`version` up to its '+changes' suffix: changes through the API do not change
        what the KB covers). `kb_size` is logged."""
        base = version.split("+", 1)[0]
        if base not in self._applies:
            tops = {v[0][0] for v in self.table.values() if v}
            share = sum(map(present, tops)) / len(tops) if tops else 0.0
            self._applies[base] = share >= MIN_COVERAGE
            if tops and not self._applies[base]:
                logger.warning("index %s (%d entities) holds %.0f %% of the entities the mention prior's names "
                               "usually mean: the NIL rule does not use the prior", base, kb_size, 100 * share)
        return self._applies[base]

    @functools.cached_property
    def links(self) -> Counter[str]:
        """Entity id -> training mentions linked to it, over every form (a prior is never changed once built)."""
        out: Counter[str] = Counter()
        for seen in self.table.values():
            for entity, n in seen:
                out[entity] += n
        return out

    def features(self, mentions: list[str], tops: list[str | None], present: Callable[[str], bool]) -> np.ndarray:
        """[B, len(PRIOR_FEATURES)]: the form has a prior; its most frequent entity is not in the KB; the served top
        candidate (None: none) is that entity (all three 0 for a form the prior never saw); log(1 + the training
        mentions linked to the served top), whatever the form."""
        out = np.zeros((len(mentions), len(PRIOR_FEATURES)), np.float64)
        links = self.links
        for i, (m, top) in enumerate(zip(mentions, tops)):
            seen = self.table.get(surface_form(m))
            if seen:
                first = seen[0][0]
                out[i, :3] = (1.0, float(not present(first)), float(top == first))
            if top is not None:
                out[i, 3] = math.log1p(links.get(top, 0))
        return out
