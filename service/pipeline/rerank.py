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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, make_dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kg_index.load import KGIndex
from models.features import SEG_FIRST, Features
from models.sinkhorn import OTProblem, solve, uniform_marginals
from service.pipeline.terms import TERMS
from service.pipeline.types import OTStats
from service.pipeline.visual_memo import BlankVisualMemo, memo_for

if TYPE_CHECKING:
    from service.pipeline.explain import PlanRecorder
    from service.settings import RerankSettings

logger = logging.getLogger(__name__)

# Solver knobs of the serving path (measured with scripts/bench_sinkhorn.py on a 2-core AVX-512 CPU): the kernel
# domain's batched products run best over large chunks (per-op overhead dominates small ones), and a convergence
# test every 3 iterations instead of every one saves its reductions and syncs (an item then stops at the first
# multiple of 3 where it has converged: at most 2 extra iterations, never a looser tolerance).
CHUNK = 1024  # problems per Sinkhorn chunk
CHECK_EVERY = 3
TEXT_GROUP = 512  # text problems per length group (student_rerank): 4 groups for a batch of 64 x 32 candidates

@contextmanager
def timed(timings: dict[str, float] | None, stage: str) -> Iterator[None]:
    """Add the block's wall time (ms) to timings[stage]; nothing when timings is None."""
    if timings is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t) * 1000


def _from_settings(cls: type, rerank: RerankSettings) -> RerankConfig:
    """Every field from the setting of the same name: the config has no defaults of its own."""
    return cls(**{f.name: getattr(rerank, f.name) for f in fields(cls)})


# What the rerank stage reads from the settings: the solver's knobs and one weight per score term (TERMS), all
# copied from RerankSettings by name (`RerankConfig.from_settings(settings.rerank)`), no defaults.
RerankConfig = make_dataclass(
    "RerankConfig",
    [("eps", float), ("max_iter", int), ("tol", float), ("sinkhorn_domain", str), ("sinkhorn_backend", str),
     ("retrieval_weight", float),
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


def _solve(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: RerankConfig) -> tuple[torch.Tensor, OTStats]:
    """The serving solve: early stopping at cfg.tol, in cfg.sinkhorn_domain -> (plan, stats)."""
    res = solve(OTProblem(cost=cost, a=a, b=b, eps=cfg.eps), max_iter=cfg.max_iter, tol=cfg.tol, chunk_size=CHUNK,
                domain=cfg.sinkhorn_domain, check_every=CHECK_EVERY, backend=cfg.sinkhorn_backend)
    err = float(res.marginal_error.max()) if res.marginal_error.numel() else 0.0
    return res.plan, OTStats(cost.shape[0], res.iterations, int(res.converged.sum()), err)


def _ot_scores(q: torch.Tensor, q_mask: torch.Tensor, e: torch.Tensor, e_mask: torch.Tensor,
               cfg: RerankConfig, timings: dict[str, float] | None = None,
               keep: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, OTStats]:
    """q [B, N, d], q_mask [B, N], e [B, K, M, d], e_mask [B, K, M] -> OT scores [B, K]. With `keep`, the
    plans [B*K, N, M] it scored with are appended to it (explain=true)."""
    b, k, m, d = e.shape
    n = q.shape[1]
    with timed(timings, "rerank_pool"):
        qx = q.unsqueeze(1).expand(b, k, n, d).reshape(b * k, n, d)
        ex = e.reshape(b * k, m, d)
        sim = qx @ ex.transpose(1, 2)  # [B*K, N, M] cosines (features are unit-norm)
    with timed(timings, "rerank_sinkhorn"):
        # A problem without candidate mass (no candidate in that slot) gets no mass on either side: a zero plan.
        has = e_mask.any(-1, keepdim=True)  # [B, K, 1]
        a = uniform_marginals((q_mask.unsqueeze(1) & has).reshape(b * k, n), dtype=sim.dtype)
        bm = uniform_marginals(e_mask.reshape(b * k, m), dtype=sim.dtype)
        plan, stats = _solve(1.0 - sim, a, bm, cfg)
    if keep is not None:
        keep.append(plan)
    with timed(timings, "rerank_pool"):
        score = (plan * sim).sum((1, 2)).reshape(b, k)
    return score, stats


# A cross scorer: (index, features, candidate rows [B, K], config, device, timings) -> (scores [B, K], solver
# stats); it adds its sub-stage times (RERANK_STAGES: gather, sinkhorn, pool) to timings when given one.
CrossScorer = Callable[..., tuple[np.ndarray, list[OTStats]]]


def ot_rerank(index: KGIndex, feats: Features, rows: np.ndarray, cfg: RerankConfig,
              device: torch.device, timings: dict[str, float] | None = None,
              recorder: PlanRecorder | None = None) -> tuple[np.ndarray, list[OTStats]]:
    """OT scores [B, K] for the candidate rows [B, K] (row -1 = no candidate, score 0). With a `recorder`, the
    plans of the mentions it wants are kept in it (service/pipeline/explain.py)."""
    b, k = rows.shape
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    flat = safe.reshape(-1)
    with timed(timings, "rerank_gather"):
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
        args = (q_tok.to(device), q_mask.to(device), ent_tok.to(device), ent_mask_t.to(device))
    keep: list[torch.Tensor] | None = [] if recorder is not None else None
    text, tstats = _ot_scores(*args, cfg, timings, keep)
    scores = text.cpu().numpy()
    stats = [tstats]
    if recorder is not None and keep:
        from service.pipeline.explain import UnitPlans

        plans = keep[0].reshape(b, k, n, m).cpu().numpy()
        for _, p in recorder.wanted(np.arange(b)):
            recorder.text[p] = UnitPlans(plans[p], q_mask[p].numpy(), ent_mask[p, :, :m], scores[p].copy(),
                                         valid[p].copy())

    # Visual unit: only for (query, candidate) pairs where both sides have an image.
    img_rows = index.image_rows[safe] * valid - (~valid)  # [B, K], -1 when absent
    pairs = np.argwhere(feats.image_present[:, None] & (img_rows >= 0))
    if len(pairs):
        qi, cj = pairs[:, 0], pairs[:, 1]
        with timed(timings, "rerank_gather"):
            qp = torch.from_numpy(feats.image_local[qi])  # [P, patches, d]
            ep = torch.from_numpy(np.asarray(index.image_local[img_rows[qi, cj]], dtype=np.float32))
            ones_q = torch.ones(qp.shape[:2], dtype=torch.bool)
            ones_e = torch.ones(ep.shape[:2], dtype=torch.bool)
            args = (qp.to(device), ones_q.to(device), ep.unsqueeze(1).to(device), ones_e.unsqueeze(1).to(device))
        keep = [] if recorder is not None else None
        vis, vstats = _ot_scores(*args, cfg, timings, keep)
        vis_np = vis.squeeze(1).cpu().numpy()
        scores[qi, cj] = 0.5 * (scores[qi, cj] + vis_np)
        stats.append(vstats)
        if recorder is not None and keep:
            from service.pipeline.explain import UnitPlans

            plans = keep[0].cpu().numpy()  # [P, patches, patches], one per pair
            for _, p in recorder.wanted(np.arange(b)):
                mine = np.flatnonzero(qi == p)
                if not len(mine):
                    continue
                n_p = plans.shape[1]
                unit = UnitPlans(np.zeros((k, n_p, plans.shape[2]), np.float32), np.ones(n_p, bool),
                                 np.ones((k, plans.shape[2]), bool), np.zeros(k, np.float32), np.zeros(k, bool))
                unit.plan[cj[mine]], unit.values[cj[mine]], unit.solved[cj[mine]] = plans[mine], vis_np[mine], True
                recorder.visual[p] = unit
    return np.where(valid, scores, 0.0).astype(np.float32), stats


# ---------------------------------------------------------------- trained student (OT-MEL units)


def _ot_assignment(cfg: RerankConfig, stats: list[OTStats], timings: dict[str, float] | None = None,
                   keep: list[torch.Tensor] | None = None):
    """OT-MEL's correlation assignment with the serving solver: plan normalised per row and per column. With
    `keep`, each solved plan (shaped as the similarities) is appended to it (explain=true)."""

    def assign(sim: torch.Tensor, mask_r: torch.Tensor, mask_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with timed(timings, "rerank_sinkhorn"):
            n = sim.shape[:-2].numel()
            s = sim.reshape(n, *sim.shape[-2:])
            a = uniform_marginals(mask_r.reshape(n, -1), dtype=s.dtype)
            b = uniform_marginals(mask_c.reshape(n, -1), dtype=s.dtype)
            plan, st = _solve(1.0 - s, a, b, cfg)
            stats.append(st)
            plan = plan.reshape(sim.shape)
            if keep is not None:
                keep.append(plan)
            rows = plan / plan.sum(-1, keepdim=True).clamp_min(1e-30)
            cols = plan / plan.sum(-2, keepdim=True).clamp_min(1e-30)
        return rows, cols

    return assign


def _pool_timed(timings: dict[str, float] | None, fn, *args, **kwargs) -> torch.Tensor:
    """fn(*args) (a g2l function of models/otmel.py); its time goes to rerank_pool, less the solve's (which the
    assignment adds to rerank_sinkhorn)."""
    before = timings.get("rerank_sinkhorn", 0.0) if timings is not None else 0.0
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    if timings is not None:
        solve_ms = timings.get("rerank_sinkhorn", 0.0) - before
        timings["rerank_pool"] = timings.get("rerank_pool", 0.0) + (time.perf_counter() - t) * 1000 - solve_ms
    return out


def _last_content(seg: np.ndarray) -> np.ndarray:
    """Per row of segment codes [..., T]: 1 + the position of the last content token (0 when none)."""
    content = seg > 0
    return np.where(content.any(-1), seg.shape[-1] - np.argmax(content[..., ::-1], axis=-1), 0)


def blank_visual_memo(index: KGIndex, cfg: RerankConfig, device: torch.device) -> BlankVisualMemo:
    """The remembered visual terms of mentions without an image against this index's image rows, under the solver
    setting the values depend on."""
    return memo_for(index.image_local, (cfg.eps, cfg.max_iter, cfg.tol, cfg.sinkhorn_domain, cfg.sinkhorn_backend,
                                        str(device)))


def student_rerank(index: KGIndex, feats: Features, rows: np.ndarray, cfg: RerankConfig,
                   device: torch.device, timings: dict[str, float] | None = None,
                   recorder: PlanRecorder | None = None) -> tuple[np.ndarray, list[OTStats]]:
    """The student's cross terms for candidate rows [B, K] (-1 = none): (g2l_text + g2l_visual) / 6 [B, K].

    Added to the retrieval score (the separable part) this is OT-MEL's overall score, with Sinkhorn over
    the student's local features (models/otmel.py: candidate_g2l, cross_g2l's serving path). With a `recorder`,
    the plans of the mentions it wants and their g2l terms are kept in it (service/pipeline/explain.py)."""
    from models.otmel import candidate_g2l, cross_g2l

    assert index.unit_globals is not None and index.image_blank is not None and feats.unit_globals is not None
    b, k = rows.shape
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    stats: list[OTStats] = []
    assign = _ot_assignment(cfg, stats, timings)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)

    # Text unit, every mention against its own candidates. Padding carries no mass, so each group of mentions of
    # similar length is cut to its own longest mention and candidate (real mentions run 4-30 tokens: about half
    # the padded cells go), which changes no value; a missing candidate is an empty (zero-mass) problem.
    with timed(timings, "rerank_gather"):
        e_seg = np.asarray(index.text_seg[safe.reshape(-1)]).reshape(b, k, -1) * valid[..., None]
        e_len = _last_content(e_seg)  # [B, K]
        q_len = _last_content(feats.text_seg)  # [B]
        ug = np.asarray(index.unit_globals[safe.reshape(-1)], dtype=np.float32).reshape(b, k, 2, -1)
        n_groups = max(1, min(b, round(b * k / TEXT_GROUP)))
        groups = np.array_split(np.argsort(q_len, kind="stable"), n_groups)
    text = np.zeros((b, k), np.float32)
    for g in groups:
        with timed(timings, "rerank_gather"):
            n, m = max(int(q_len[g].max()), 1), max(int(e_len[g].max()), 1)
            e_tok = np.asarray(index.text_local[safe[g].reshape(-1), :m])  # fp16 [G*K, m, d]
            args = (t(feats.text_local[g, :n]), t(feats.text_seg[g, :n] > 0), t(feats.unit_globals[g, 0]),
                    t(e_tok).float().view(len(g), k, m, -1), t(e_seg[g, :, :m] > 0), t(ug[g, :, 0]))
        mine = recorder.wanted(g) if recorder is not None else []
        keep: list[torch.Tensor] | None = [] if mine else None
        group_assign = _ot_assignment(cfg, stats, timings, keep) if mine else assign
        text[g] = _pool_timed(timings, candidate_g2l, *args, group_assign).cpu().numpy()
        if mine:
            from service.pipeline.explain import UnitPlans

            plans = keep[0].view(len(g), k, n, m).cpu().numpy()
            for gi, p in mine:
                recorder.text[p] = UnitPlans(plans[gi], feats.text_seg[p, :n] > 0, e_seg[p, :, :m] > 0,
                                             text[p].copy(), valid[p].copy())

    # Visual unit: one problem per distinct (mention image, entity image) in the batch, a missing image on either
    # side being the blank image's features (the same for every mention and entity without one). A mention with
    # an image against its candidates without one is then a single problem, and so is blank against blank. A
    # mention without an image against an image row solved before takes the remembered value (visual_memo.py).
    want_vis = recorder is not None and bool(recorder.want.any())
    with timed(timings, "rerank_gather"):
        qi = np.repeat(np.arange(b), k)
        img_rows = index.image_rows[safe.reshape(-1)]
        keys = np.stack([np.where(feats.image_present[qi], qi, -1), np.maximum(img_rows, -1)], axis=1)
        _, todo, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)  # todo: a pair per key
        vis = np.zeros(len(todo), np.float32)
        memo = slots = None
        if not want_vis:  # explain=true wants the plans themselves: solved every time
            memo = blank_visual_memo(index, cfg, device)
            slots = np.where(keys[todo, 0] < 0, memo.slots(keys[todo, 1]), -1)  # blank mentions only
            hit = (slots >= 0) & memo.known[np.maximum(slots, 0)]
            vis[hit] = memo.values[slots[hit]]
            memo.hits += int(hit.sum())
            solve_at = np.flatnonzero(~hit)
        else:
            solve_at = np.arange(len(todo))
        pairs = todo[solve_at]
        if len(pairs):
            e_img = np.where((img_rows[pairs] >= 0)[:, None, None],
                             np.asarray(index.image_local[np.maximum(img_rows[pairs], 0)], dtype=np.float32)
                             if index.n_image_rows else 0.0,
                             np.asarray(index.image_blank, dtype=np.float32)[None])
            ones_q = torch.ones(len(pairs), feats.image_local.shape[1], dtype=torch.bool, device=device)
            ones_e = torch.ones(len(pairs), e_img.shape[1], dtype=torch.bool, device=device)
            vis_args = (t(feats.image_local[qi[pairs]]), ones_q, t(feats.unit_globals[qi[pairs], 1]),
                        t(e_img.astype(np.float32)), ones_e, t(ug.reshape(b * k, 2, -1)[pairs, 1]))
    keep = [] if want_vis else None
    if len(pairs):
        vis_assign = _ot_assignment(cfg, stats, timings, keep) if want_vis else assign
        solved = _pool_timed(timings, cross_g2l, *vis_args, vis_assign, pairwise=False, fast=True)[0].cpu().numpy()
        vis[solve_at] = solved
        if memo is not None and slots is not None:
            memo.store(slots[solve_at], solved)
    per_pair = inverse.reshape(b, k)
    scores = (text + vis[per_pair]) / 6.0
    if want_vis:
        from service.pipeline.explain import UnitPlans

        plans = keep[0].cpu().numpy()  # [distinct pairs, patches, patches]
        for _, p in recorder.wanted(np.arange(b)):
            pp = per_pair[p]
            recorder.visual[p] = UnitPlans(plans[pp], np.ones(plans.shape[1], bool),
                                           np.ones((k, plans.shape[2]), bool), vis[pp].copy(), valid[p].copy())
    return np.where(valid, scores, 0.0).astype(np.float32), stats
