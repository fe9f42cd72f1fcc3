"""Rerank stage: the cross scorers, optimal-transport matching of local features between a mention and each
candidate. One of them is chosen per index, when its snapshot is made (linker.make_snapshot):

- zero-shot features (`ot_rerank`): text unit, the mention's tokens (`mention [SEP] sentence`) against the
  candidate's name tokens; visual unit, the mention's image patches against the candidate's, when both have an
  image. Each unit's score is the transport-weighted cosine  sum_ij P_ij cos(x_i, y_j)  of the entropic OT plan
  (cost 1 - cos, uniform marginals over real tokens/patches); the OT score averages the units present.
- the trained student's features (`student_rerank`): OT-MEL's cross terms (g2l_text + g2l_visual) / 6.

The cross score is the `rerank_score` term; the final score mixes it with the retrieval score and the other
terms (service/pipeline/terms.py), weighted by the settings through `RerankConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields, make_dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kg_index.load import KGIndex
from models.features import SEG_FIRST, Features
from models.sinkhorn import OTProblem, solve, uniform_marginals
from service.pipeline.terms import TERMS
from service.pipeline.types import OTStats

if TYPE_CHECKING:
    from service.settings import RerankSettings

logger = logging.getLogger(__name__)

CHUNK = 64  # problems per Sinkhorn chunk: keeps the working set in cache (about 4x on CPU)


def _from_settings(cls: type, rerank: RerankSettings) -> RerankConfig:
    """Every field from the setting of the same name: the config has no defaults of its own."""
    return cls(**{f.name: getattr(rerank, f.name) for f in fields(cls)})


# What the rerank stage reads from the settings: the solver's knobs and one weight per score term (TERMS), all
# copied from RerankSettings by name (`RerankConfig.from_settings(settings.rerank)`), no defaults.
RerankConfig = make_dataclass(
    "RerankConfig",
    [("eps", float), ("max_iter", int), ("tol", float), ("retrieval_weight", float),
     *((t.weight, float) for t in TERMS), ("device", str)],
    frozen=True,
    namespace={"from_settings": classmethod(_from_settings), "__module__": __name__},
)


def pick_device(setting: str) -> torch.device:
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        logger.warning("CUDA requested for Sinkhorn but torch sees no GPU; using the CPU")
    return torch.device("cpu")


def _ot_scores(q: torch.Tensor, q_mask: torch.Tensor, e: torch.Tensor, e_mask: torch.Tensor,
               cfg: RerankConfig) -> tuple[torch.Tensor, OTStats]:
    """q [B, N, d], q_mask [B, N], e [B, K, M, d], e_mask [B, K, M] -> OT scores [B, K]."""
    b, k, m, d = e.shape
    n = q.shape[1]
    qx = q.unsqueeze(1).expand(b, k, n, d).reshape(b * k, n, d)
    ex = e.reshape(b * k, m, d)
    sim = qx @ ex.transpose(1, 2)  # [B*K, N, M] cosines (features are unit-norm)
    # A problem without candidate mass (no candidate in that slot) gets no mass on either side: a zero plan.
    has = e_mask.any(-1, keepdim=True)  # [B, K, 1]
    a = uniform_marginals((q_mask.unsqueeze(1) & has).reshape(b * k, n), dtype=sim.dtype)
    bm = uniform_marginals(e_mask.reshape(b * k, m), dtype=sim.dtype)
    res = solve(OTProblem(cost=1.0 - sim, a=a, b=bm, eps=cfg.eps), max_iter=cfg.max_iter, tol=cfg.tol, chunk_size=CHUNK)
    score = (res.plan * sim).sum((1, 2)).reshape(b, k)
    err = float(res.marginal_error.max()) if res.marginal_error.numel() else 0.0
    stats = OTStats(b * k, res.iterations, int(res.converged.sum()), err)
    return score, stats


# A cross scorer: (index, features, candidate rows [B, K], config, device) -> (scores [B, K], solver stats).
CrossScorer = Callable[[KGIndex, Features, np.ndarray, "RerankConfig", torch.device], tuple[np.ndarray, list[OTStats]]]


def ot_rerank(index: KGIndex, feats: Features, rows: np.ndarray, cfg: RerankConfig,
              device: torch.device) -> tuple[np.ndarray, list[OTStats]]:
    """OT scores [B, K] for the candidate rows [B, K] (row -1 = no candidate, score 0)."""
    b, k = rows.shape
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    flat = safe.reshape(-1)
    ent_seg = np.asarray(index.text_seg[flat]).reshape(b, k, -1)
    ent_mask = (ent_seg == SEG_FIRST) & valid[..., None]
    # Name tokens sit at the start of each entity's sequence: cut the all-padding tail before solving
    # (often 40 -> 10 columns), which changes no plan since padding carries no mass.
    m = int(np.flatnonzero(ent_mask.any(axis=(0, 1))).max(initial=0)) + 1
    n = int(np.flatnonzero((feats.text_seg > 0).any(axis=0)).max(initial=0)) + 1
    ent_tok = torch.from_numpy(np.asarray(index.text_local[flat, :m], dtype=np.float32)).reshape(b, k, m, -1)
    ent_mask_t = torch.from_numpy(ent_mask[:, :, :m])
    q_tok = torch.from_numpy(feats.text_local[:, :n])
    q_mask = torch.from_numpy(feats.text_seg[:, :n] > 0)
    text, tstats = _ot_scores(q_tok.to(device), q_mask.to(device), ent_tok.to(device), ent_mask_t.to(device), cfg)
    scores = text.cpu().numpy()
    stats = [tstats]

    # Visual unit: only for (query, candidate) pairs where both sides have an image.
    img_rows = index.image_rows[safe] * valid - (~valid)  # [B, K], -1 when absent
    pairs = np.argwhere(feats.image_present[:, None] & (img_rows >= 0))
    if len(pairs):
        qi, cj = pairs[:, 0], pairs[:, 1]
        qp = torch.from_numpy(feats.image_local[qi])  # [P, patches, d]
        ep = torch.from_numpy(np.asarray(index.image_local[img_rows[qi, cj]], dtype=np.float32))
        ones_q = torch.ones(qp.shape[:2], dtype=torch.bool)
        ones_e = torch.ones(ep.shape[:2], dtype=torch.bool)
        vis, vstats = _ot_scores(qp.to(device), ones_q.to(device), ep.unsqueeze(1).to(device), ones_e.unsqueeze(1).to(device), cfg)
        scores[qi, cj] = 0.5 * (scores[qi, cj] + vis.squeeze(1).cpu().numpy())
        stats.append(vstats)
    return np.where(valid, scores, 0.0).astype(np.float32), stats


# ---------------------------------------------------------------- trained student (OT-MEL units)


def _ot_assignment(cfg: RerankConfig, stats: list[OTStats]):
    """OT-MEL's correlation assignment with the serving solver: plan normalised per row and per column."""

    def assign(sim: torch.Tensor, mask_r: torch.Tensor, mask_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = sim.shape[:-2].numel()
        s = sim.reshape(n, *sim.shape[-2:])
        a = uniform_marginals(mask_r.reshape(n, -1), dtype=s.dtype)
        b = uniform_marginals(mask_c.reshape(n, -1), dtype=s.dtype)
        res = solve(OTProblem(cost=1.0 - s, a=a, b=b, eps=cfg.eps), max_iter=cfg.max_iter, tol=cfg.tol, chunk_size=CHUNK)
        err = float(res.marginal_error.max()) if res.marginal_error.numel() else 0.0
        stats.append(OTStats(n, res.iterations, int(res.converged.sum()), err))
        plan = res.plan.reshape(sim.shape)
        rows = plan / plan.sum(-1, keepdim=True).clamp_min(1e-30)
        cols = plan / plan.sum(-2, keepdim=True).clamp_min(1e-30)
        return rows, cols

    return assign


def student_rerank(index: KGIndex, feats: Features, rows: np.ndarray, cfg: RerankConfig,
                   device: torch.device) -> tuple[np.ndarray, list[OTStats]]:
    """The student's cross terms for candidate rows [B, K] (-1 = none): (g2l_text + g2l_visual) / 6 [B, K].

    Added to the retrieval score (the separable part) this is OT-MEL's overall score, with Sinkhorn over
    the student's local features (models/otmel.py: cross_g2l)."""
    from models.otmel import cross_g2l

    assert index.unit_globals is not None and index.image_blank is not None and feats.unit_globals is not None
    b, k = rows.shape
    valid = rows >= 0
    flat = np.where(valid, rows, 0).reshape(-1)
    qi = np.repeat(np.arange(b), k)
    stats: list[OTStats] = []
    assign = _ot_assignment(cfg, stats)

    # Text unit: all content tokens; cut the padding tail shared by every row (no mass there).
    e_seg = np.asarray(index.text_seg[flat])
    m = int(np.flatnonzero((e_seg > 0).any(0)).max(initial=0)) + 1
    n = int(np.flatnonzero((feats.text_seg > 0).any(0)).max(initial=0)) + 1
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    ug = np.asarray(index.unit_globals[flat], dtype=np.float32)  # [BK, 2, d]
    text, _, _ = cross_g2l(
        t(feats.text_local[qi, :n]), t(feats.text_seg[qi, :n] > 0), t(feats.unit_globals[qi, 0]),
        t(np.asarray(index.text_local[flat, :m], dtype=np.float32)), t(e_seg[:, :m] > 0), t(ug[:, 0]),
        assign, pairwise=False)
    # Visual unit: rows with neither image share one value (blank against blank): solve it once.
    img_rows = index.image_rows[flat]
    has = feats.image_present[qi] | (img_rows >= 0)
    visual = np.zeros(b * k, np.float32)
    todo = np.flatnonzero(has)
    blank_q = np.flatnonzero(~feats.image_present)
    if len(blank_q) and (~has).any():
        todo = np.concatenate([todo, [int(np.flatnonzero(~has)[0])]])
    if len(todo):
        e_img = np.where((img_rows[todo] >= 0)[:, None, None],
                         np.asarray(index.image_local[np.maximum(img_rows[todo], 0)], dtype=np.float32)
                         if index.n_image_rows else 0.0,
                         np.asarray(index.image_blank, dtype=np.float32)[None])
        ones_q = torch.ones(len(todo), feats.image_local.shape[1], dtype=torch.bool, device=device)
        ones_e = torch.ones(len(todo), e_img.shape[1], dtype=torch.bool, device=device)
        vis, _, _ = cross_g2l(t(feats.image_local[qi[todo]]), ones_q, t(feats.unit_globals[qi[todo], 1]),
                              t(e_img.astype(np.float32)), ones_e, t(ug[todo, 1]), assign, pairwise=False)
        vis = vis.cpu().numpy()
        visual[todo] = vis
        if (~has).any():
            visual[~has] = vis[-1]
    scores = (text.cpu().numpy() + visual) / 6.0
    return np.where(valid, scores.reshape(b, k), 0.0).astype(np.float32), stats
