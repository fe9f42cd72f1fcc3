"""An int8 copy of a Flat index's vectors and a bound on its error: the first pass of the int8 shortlist.

Why: a batch of a few queries against 40,942 x 384 vectors is bound by streaming the vectors, not by arithmetic,
and the int8 copy is a quarter of the fp32 bytes. FBGEMM's dynamic int8 linear (the kernel behind torch's dynamic
quantization: the queries quantized per call, the vectors kept prepacked, u8 x s8 products summed in int32) took
1.0 ms for 8 queries on one thread of this project's Xeon, against 7.0 for the fp32 GEMM and 4.8 for bf16
(*exploratory*, `scripts/bench_retrieval_int8.py` measures it on any machine). Its scores are approximate, so
ExactSearch uses them only to pick a shortlist, rescores that in fp32 and checks the result against `bound`,
exactly as the bf16 shortlist does (kg_index/exact.py).

The bound, per query q against any row x (x~ its int8 copy, q~ the query as FBGEMM quantized it):
    q.x - q~.x~ = (q - q~).x + q~.(x - x~)
    |(q - q~).x| <= s/2 * max ||x||_1        (every component of q rounded to a step s = range / 255)
    |q~.(x - x~)| <= (||q|| + sqrt(d) s/2) * max ||x - x~||_2
with s from the batch's own range (FBGEMM quantizes the whole input with one scale and zero point, the range
stretched to include 0), plus a relative hair (1e-3) for the fp32 arithmetic around the int32 sums, which are
exact (at most 255 * 127 * d: below 2^24 up to d = 512, so even their conversion to fp32 is exact there).

One trap: CPUs without VNNI multiply u8 x s8 pairs with an instruction that saturates at 2^15, which full-range
activations can hit (255 * 127 * 2). `int8_usable` runs that worst case once per process and refuses the kernel
where it saturates (and where the torch build has no FBGEMM), so the bound above is never silently wrong.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np
import torch

logger = logging.getLogger(__name__)

_LEVELS = 255.0  # full-range u8 activations (reduce_range=False): VNNI's dot products do not saturate
_REL = 1e-3  # relative slack on the bound: the scale's own float rounding, the fp32 epilogue


_CHUNK = 65536  # rows per step of the statistics below: no full-size fp32 temporary for a large index
# Rows per block of `Int8Scores.top`'s first pass (a block's best score stands for its block). The top 256 of 40,942
# scores in blocks of 32 rows: 1.5-2.7x faster than one torch.topk over all of them for 1 to 16 queries; blocks of
# 16 and of 64 rows gained less (*exploratory*).
BLOCK = 32


def _pack(vectors: torch.Tensor) -> tuple[object, float, float]:
    """FBGEMM's prepacked per-row symmetric int8 copy of vectors [N, D] fp32, padded with zero rows to a multiple of
    BLOCK rows, the largest L1 norm of a row and the largest L2 norm of a row's rounding error (the copy dequantized
    minus the row)."""
    n = len(vectors)
    scales = torch.cat([vectors[i : i + _CHUNK].abs().amax(dim=1) for i in range(0, n, _CHUNK)])
    scales = (scales / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch, still the way into FBGEMM here
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(vectors, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        ints = q.int_repr()
        pad = -n % BLOCK
        padded = torch._make_per_channel_quantized_tensor(
            torch.cat([ints, ints.new_zeros(pad, ints.shape[1])]), torch.cat([scales, scales.new_ones(pad)]),
            torch.zeros(n + pad, dtype=torch.long), 0) if pad else q
        packed = torch.ops.quantized.linear_prepack(padded, None)
    l1 = residual = 0.0
    for i in range(0, len(vectors), _CHUNK):
        rows = vectors[i : i + _CHUNK]
        approx = ints[i : i + _CHUNK].float() * scales[i : i + _CHUNK, None].float()
        l1 = max(l1, float(rows.abs().sum(dim=1).max()))
        residual = max(residual, float((rows - approx).norm(dim=1).max()))
    return packed, l1, residual


@functools.cache
def int8_usable() -> bool:
    """Whether this torch build runs FBGEMM's dynamic int8 linear, without saturating, on this CPU (checked once
    per process on the worst case for a saturating u8 x s8 pair sum)."""
    try:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return False
        d = 64
        x = torch.ones(2, d)
        x[1, ::2] = -1.0  # mixed signs: the other sign of pair sums
        q = torch.ones(1, d)
        q[0, 0] = -1.0  # a range of [-1, 1]: the other components quantize to 255
        kernel = Int8Scores(x)
        err = (kernel.scores(q) - q @ x.T).abs().max()
        ok = bool(err <= kernel.bound(q)[0])  # saturated sums miss by about half the score (~30 here)
        if not ok:
            logger.info("int8 shortlist off: FBGEMM's int8 products saturate on this CPU (error %.3g)", float(err))
        return ok
    except (RuntimeError, AttributeError, TypeError) as exc:  # a torch build without (these) quantized ops
        logger.info("int8 shortlist off: %s", exc)
        return False


class Int8Scores:
    """Approximate inner products of queries against an int8 copy of vectors [N, D] (made here: ~10 ms for 41k x
    384), with `bound` on their error."""

    def __init__(self, vectors: torch.Tensor) -> None:
        if vectors.ndim != 2 or not len(vectors):
            raise ValueError(f"vectors must be [N, D] with N > 0, got {tuple(vectors.shape)}")
        self._packed, self._l1, self._residual = _pack(vectors)
        self.rows, self.dim = int(vectors.shape[0]), int(vectors.shape[1])

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, N] fp32 approximate scores (one FBGEMM call, on torch's intra-op threads)."""
        return self._padded_scores(queries)[:, : self.rows]

    def _padded_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, N rounded up to BLOCK] fp32: the padding rows' scores are 0."""
        with torch.no_grad():
            return torch.ops.quantized.linear_dynamic(queries, self._packed, False)

    def top(self, queries: torch.Tensor, s: int, dead: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(approximate scores [B, s], rows [B, s]) in no order: s rows of each query such that every other row
        scores at most the smallest of them (the top s, ties aside). `dead` [N] bool: rows scored -inf. Needs
        s < N. Two passes: the s blocks of BLOCK rows with the best maxima, then the top s of their rows (a row
        outside those blocks scores at most the s-th best maximum, which is at most the s-th best row's score)."""
        n = self.rows
        with torch.no_grad():
            scores = self._padded_scores(queries)
            scores[:, n:] = float("-inf")
            if dead is not None:
                scores[:, :n].masked_fill_(dead, float("-inf"))
            b, blocks = len(scores), scores.shape[1] // BLOCK
            if s * 4 > blocks:  # few blocks to skip: one top-k over every row
                return torch.topk(scores[:, :n], s, dim=1, sorted=False)
            by_block = scores.view(b, blocks, BLOCK)
            _, best = torch.topk(by_block.amax(dim=2), s, dim=1, sorted=False)
            cand = torch.gather(by_block, 1, best[:, :, None].expand(b, s, BLOCK)).view(b, s * BLOCK)
            values, at = torch.topk(cand, s, dim=1, sorted=False)
            return values, torch.gather(best, 1, at // BLOCK) * BLOCK + at % BLOCK

    def bound(self, queries: torch.Tensor) -> torch.Tensor:
        """[B] float64: |approximate - exact score| of each query against any row is at most this (module doc)."""
        q = queries.double()
        step = (max(float(q.max()), 0.0) - min(float(q.min()), 0.0)) / _LEVELS
        half = step / 2
        rounded_norm = q.norm(dim=1) + math.sqrt(self.dim) * half
        return (half * self._l1 + rounded_norm * self._residual) * (1 + _REL) + 1e-7


def int8_scores_error(vectors: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    """(largest |approximate - exact| score, smallest bound) over queries x vectors (scripts/bench_retrieval_int8.py)."""
    v, q = torch.from_numpy(vectors), torch.from_numpy(queries)
    s = Int8Scores(v)
    err = (s.scores(q) - q @ v.T).abs().max()
    return float(err), float(s.bound(q).min())
