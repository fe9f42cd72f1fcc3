"""The NIL protocol: real mentions whose answer is not in the KB, without rebuilding the index.

For one split, a fixed-seed share (NIL_FRACTION, 20 %) of the distinct gold entities of its mentions is removed
from the KB: their rows are masked at search time (`Linker.with_excluded`: the retrieve stage drops them before the
rerank, so the KB left is exactly the KB without them). Every mention whose gold was removed then has no answer
(NIL); the others keep theirs. Dev and test draw their own removals (each split's own golds, same seed), so a NIL
rule fitted on dev meets unseen removals on test.

Metrics (`nil_metrics`): NIL precision, recall and F1 (the positive class is "no answer"), and H@1 on the
mentions that do have an answer, where a NIL verdict on them counts as a miss.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NIL_FRACTION = 0.2
NIL_SEED = 18
# The answerable model is fitted on each dev split under several draws of removals (the protocol's seed first):
# one draw leaves ~500 NIL mentions per split, too few for the model's pairwise products. Evaluation uses NIL_SEED.
FIT_SEEDS = (NIL_SEED, 19, 20, 21, 22)


def removed_entities(golds: Iterable[str], fraction: float = NIL_FRACTION, seed: int = NIL_SEED) -> frozenset[str]:
    """round(fraction x distinct golds) of them, drawn with numpy's default_rng(seed) from their sorted list:
    the same set for the same golds on any machine, whatever their order."""
    distinct = sorted(set(golds))
    n = round(fraction * len(distinct))
    picks = np.random.default_rng(seed).choice(len(distinct), size=n, replace=False)
    return frozenset(distinct[i] for i in sorted(picks))


def nil_metrics(no_answer: np.ndarray, said_nil: np.ndarray, top1_right: np.ndarray) -> dict[str, float | int]:
    """no_answer [N] bool (the gold was removed), said_nil [N] bool (the verdict), top1_right [N] bool (the top
    entity is the gold; always False where no_answer). Precision and recall of the NIL verdict, its F1, and H@1 on
    the answerable mentions with a NIL verdict counted as a miss (`h@1_answerable`), beside their H@1 ignoring the
    verdict (`h@1_answerable_ranked`)."""
    no_answer, said_nil, right = (np.asarray(a, bool) for a in (no_answer, said_nil, top1_right))
    tp = int((no_answer & said_nil).sum())
    precision = tp / max(int(said_nil.sum()), 1)
    recall = tp / max(int(no_answer.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    answerable = ~no_answer
    n_ans = max(int(answerable.sum()), 1)
    return {"n_mentions": len(no_answer), "n_nil": int(no_answer.sum()), "n_said_nil": int(said_nil.sum()),
            "nil_precision": round(precision, 4), "nil_recall": round(recall, 4), "nil_f1": round(f1, 4),
            "h@1_answerable": round(float((answerable & right & ~said_nil).sum()) / n_ans, 4),
            "h@1_answerable_ranked": round(float((answerable & right).sum()) / n_ans, 4)}
