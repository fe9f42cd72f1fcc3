"""Length bands of the encoder runs: every row exactly once, bands by length, no run below the floor."""

from __future__ import annotations

import numpy as np
import pytest

from models.runtime import length_buckets


@pytest.mark.parametrize("lengths", [[5], [40] * 3, [3, 40, 9, 17, 33, 25, 12, 8, 40, 6, 30, 21, 14, 2, 38, 19],
                                     list(range(1, 41)), [40, 3, 3, 3]])
def test_every_row_once_and_bands_sorted_by_length(lengths: list[int]) -> None:
    arr = np.asarray(lengths)
    groups = length_buckets(arr, step=8, least=4)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(arr)))
    assert all(len(g) >= 4 for g in groups) or len(groups) == 1
    tops = [arr[g].max() for g in groups]
    assert tops == sorted(tops)


def test_bands_cut_the_padding() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(5, 41, size=64)
    groups = length_buckets(arr, step=8, least=4)
    padded = sum(len(g) * arr[g].max() for g in groups)
    assert len(groups) > 1 and padded < 0.75 * len(arr) * arr.max()
    assert all(arr[g].max() - arr[g].min() < 16 for g in groups)  # a band plus at most a merged neighbour
