"""The skip-margin fit (service/offline/skip_margin.py): the most skipping whose H@1 loss stays within bounds."""

from __future__ import annotations

import numpy as np

from service.offline.skip_margin import SplitMargins, fit


def test_fit_takes_the_smallest_margin_within_the_loss_on_every_split() -> None:
    # Split a: OT only helps the mention at margin 0.05; split b: OT only helps at margin 0.2.
    a = SplitMargins("a", np.array([0.01, 0.05, 0.3, 0.5]), np.array([True, True, True, False]),
                     np.array([True, False, True, False]))
    b = SplitMargins("b", np.array([0.2, 0.4, np.inf]), np.array([True, True, True]), np.array([False, True, True]))
    assert a.h1(np.inf) == 0.75 and a.h1(0.0) == 0.5 and a.skipped(0.04) == 0.75
    out = fit([a, b], max_loss=0.0)
    # Skipping at 0.2 keeps both OT wins (0.05 <= 0.2 and 0.2 <= 0.2); at 0.05 split b loses its win.
    assert out["skip_margin"] == 0.2
    assert out["at_fit"]["a"]["h1_points_vs_always"] == 0.0 and out["at_fit"]["b"]["skipped"] == round(2 / 3, 4)
    # Allowed to lose a's win (1/4) and b's (1/3): skip every mention.
    assert fit([a, b], max_loss=0.34)["skip_margin"] == float("-inf")
    assert out["table"][-1]["margin"] is None and out["table"][-1]["a"]["skipped"] == 0.0
    assert fit([a, b], max_loss=0.3)["skip_margin"] == 0.2  # b's win (1/3) may not be lost
