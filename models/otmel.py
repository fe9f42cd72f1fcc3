"""OT-MEL matching units shared by the teacher (models/teacher.py) and the student (models/student.py).

Both models are the same network over frozen backbone features; they differ only in the
*correlation assignment* that decides which token (or patch) corresponds to which:
  teacher: entropic optimal transport (Sinkhorn, uniform marginals, cost = 1 - cosine, detached)
  student: dot-product attention, softmax over rows and over columns
An assignment maps a similarity tensor [..., N, M] to two maps of the same shape:
  rows[..., i, :] sums to 1 over valid j   (what row item i receives from the columns)
  cols[..., :, j] sums to 1 over valid i   (what column item j receives from the rows)

Per item (mention or entity) an `ItemHead` turns backbone features into
  text locals  [B, T, d]  unit rows (zeros on padding)     image locals [B, P, d]  unit rows
  text global  [B, d]     image global [B, d]              fusion vectors f_it, f_ti  [B, d]
and the retrieval vector  [g_text, g_image, f_it, f_ti] / sqrt(6)  whose dot product is the separable
part of the overall score below.

Scores for a mention m and an entity e (each term a cosine in [-1, 1]):
  text unit   = (g2g_T + g2l_T) / 2     g2g = <g_m, g_e>;  g2l = cross-assignment term (`cross_g2l`)
  visual unit = (g2g_V + g2l_V) / 2
  fusion unit = (<f_it_m, f_it_e> + <f_ti_m, f_ti_e>) / 2
  overall     = mean of the three units = retrieval dot product + (g2l_T + g2l_V) / 6
A missing image is the backbone's output for an all-zero image (a buffer of the head), as in OT-MEL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.sinkhorn import OTProblem, solve, uniform_marginals

Assignment = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_NEG = -1e4  # masked logit for the softmaxes (attention, soft pooling): exp underflows to 0, all-masked rows stay NaN-free


@dataclass
class HeadConfig:
    text_dim: int = 384  # MiniLM token states
    image_dim: int = 1280  # EfficientNet-Lite0 channels
    image_patches: int = 49  # its 7x7 map
    hidden: int = 96  # projected size of every local feature and global vector (as in OT-MEL)
    mlp: int = 384  # width of the text-global MLP
    dropout: float = 0.0  # on the text-global MLP's input (training only)


@dataclass
class ItemEncoding:
    text_local: torch.Tensor  # [B, T, d] unit rows, zeros where text_mask is False
    text_mask: torch.Tensor  # [B, T] bool
    image_local: torch.Tensor  # [B, P, d] unit rows (the blank image's when absent)
    g_text: torch.Tensor  # [B, d] unit
    g_image: torch.Tensor  # [B, d] unit
    f_it: torch.Tensor  # [B, d] unit: fusion, image -> text side
    f_ti: torch.Tensor  # [B, d] unit: fusion, text -> image side
    fusion_rows: torch.Tensor  # [B, T, P] the fusion assignment (for distillation)
    fusion_cols: torch.Tensor  # [B, T, P]
    image_present: torch.Tensor  # [B] bool: False where image_local / g_image are the blank image's

    def select(self, idx: torch.Tensor) -> ItemEncoding:
        """The encodings of rows idx (repeats allowed), every field alike."""
        return ItemEncoding(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def retrieval_vector(self) -> torch.Tensor:
        """[B, 4d]: dot products of these give the separable part of the overall score."""
        return torch.cat([self.g_text, self.g_image, self.f_it, self.f_ti], dim=-1) / math.sqrt(6.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [..., N, D], mask [..., N] -> [..., D]."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def plain_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without parameters, so the reranker needs nothing but stored features (written out: the
    ONNX exporter cannot take a traced normalized_shape)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


# ---------------------------------------------------------------- assignments


def sinkhorn_assignment(eps: float, iters: int) -> Assignment:
    """Teacher: entropic OT plan on the detached cost 1 - sim, uniform marginals over valid entries, after exactly
    `iters` Sinkhorn iterations (OT-MEL's fixed count: the project's solver without early stopping)."""

    def assign(sim: torch.Tensor, mask_r: torch.Tensor, mask_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            n, m = sim.shape[-2:]
            flat = sim.detach().float().reshape(-1, n, m)  # the solver takes [B, N, M]
            a = uniform_marginals(mask_r.expand(sim.shape[:-1]).reshape(-1, n), dtype=torch.float32)
            b = uniform_marginals(mask_c.expand(*sim.shape[:-2], m).reshape(-1, m), dtype=torch.float32)
            res = solve(OTProblem(cost=1.0 - flat, a=a, b=b, eps=eps), max_iter=iters, chunk_size=None,
                        early_stop=False)
            plan = res.plan.reshape(sim.shape)
            rows = plan / plan.sum(-1, keepdim=True).clamp_min(1e-30)
            cols = plan / plan.sum(-2, keepdim=True).clamp_min(1e-30)
        return rows.to(sim.dtype), cols.to(sim.dtype)

    return assign


def attention_assignment(temperature: float) -> Assignment:
    """Student: dot-product attention, softmax over each row and over each column (masked)."""

    def assign(sim: torch.Tensor, mask_r: torch.Tensor, mask_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = sim / temperature
        valid = mask_r.unsqueeze(-1) & mask_c.unsqueeze(-2)
        logits = logits.masked_fill(~valid, _NEG)
        rows = torch.softmax(logits, dim=-1) * valid
        cols = torch.softmax(logits, dim=-2) * valid
        return rows, cols

    return assign


# ---------------------------------------------------------------- units


def transport_context(target: torch.Tensor, source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """target [..., N, d] + (rows [..., N, M] @ source [..., M, d]), normalised: the transported values added
    to the target features (OT-MEL)."""
    return plain_norm(target + rows @ source)


def cross_g2l(m_local: torch.Tensor, m_mask: torch.Tensor, m_glob: torch.Tensor,
              e_local: torch.Tensor, e_mask: torch.Tensor, e_glob: torch.Tensor,
              assign: Assignment, *, pairwise: bool = True,
              fast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global-to-local term between mentions and entities, both directions, averaged.

    pairwise=True:  m_* [B, N, d] / [B, N] / [B, d], e_* [C, M, d] / [C, M] / [C, d] -> g2l [B, C]
    pairwise=False: aligned pairs, both sides [B, ...] -> g2l [B]
    Mention tokens receive entity values through the assignment, are pooled into a mention context vector
    and compared with the entity's global vector; the same the other way round. Also returns rows, cols.

    fast=True (serving, aligned pairs, no autograd): the same values up to float rounding from `pooled_context`,
    chunk by chunk; the teacher and training keep the direct form (fast=False).
    """
    if pairwise:
        b, c = m_local.shape[0], e_local.shape[0]
        m_local, m_mask, m_glob = m_local[:, None], m_mask[:, None].expand(b, c, -1), m_glob[:, None]
        e_local, e_mask, e_glob = e_local[None], e_mask[None].expand(b, c, -1), e_glob[None]
    sim = m_local @ e_local.transpose(-1, -2)  # [..., N, M] cosines
    rows, cols = assign(sim, m_mask, e_mask)
    if fast and not pairwise and m_local.ndim == 3:
        m_ctx = pooled_context(m_local, e_local, rows, m_mask)
        e_ctx = pooled_context(e_local, m_local, cols.transpose(-1, -2), e_mask)
    else:
        m_ctx = F.normalize(masked_mean(transport_context(m_local, e_local, rows), m_mask), dim=-1)
        e_ctx = F.normalize(masked_mean(transport_context(e_local, m_local, cols.transpose(-1, -2)), e_mask), dim=-1)
    g2l = ((e_glob * m_ctx).sum(-1) + (m_glob * e_ctx).sum(-1)) / 2
    return g2l, rows, cols


POOL_CHUNK = 128  # pairs per pooling chunk: x [128, <=49, 96] fp32 is <= 2.4 MB, about one core's L2


def pooled_context(target: torch.Tensor, source: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                   *, chunk: int = POOL_CHUNK) -> torch.Tensor:
    """F.normalize(masked_mean(transport_context(target, source, rows), mask)) for aligned pairs [B], chunk by chunk
    (cache-resident): target [B, N, d], source [B, M, d], rows [B, N, M], mask [B, N] -> [B, d]. See `_pool`."""
    weight = _weights(mask, target.dtype)
    out = [_pool(torch.baddbmm(target[sl], rows[sl], source[sl]), weight[sl])
           for sl in (slice(i, i + chunk) for i in range(0, target.shape[0], chunk))]
    return torch.cat(out) if len(out) > 1 else out[0]


def candidate_g2l(m_local: torch.Tensor, m_mask: torch.Tensor, m_glob: torch.Tensor, e_local: torch.Tensor,
                  e_mask: torch.Tensor, e_glob: torch.Tensor, assign: Assignment, *,
                  chunk: int = POOL_CHUNK) -> torch.Tensor:
    """cross_g2l of each mention against its own K candidates (the served reranker's layout), fast:
    m_* [B, N, d] / [B, N] / [B, d], e_* [B, K, M, d] / [B, K, M] / [B, K, d] -> g2l [B, K], the values of
    cross_g2l(pairwise=False) over the B*K aligned pairs up to float rounding (no autograd use intended).

    A mention's tokens meet all its candidates' in one GEMM ([N, d] x [d, K*M], far more efficient than B*K tiny
    products): the similarities, and the entity side's transported values cols^T @ m_local. Pooling follows
    `_pool` (3 passes over the transported features instead of about a dozen), a few mentions at a time so
    that each chunk stays in cache. The plans come from `assign` on all B*K problems at once.
    """
    b, k, m, d = e_local.shape
    n = m_local.shape[1]
    e_flat = e_local.reshape(b, k * m, d)
    sim = torch.bmm(m_local, e_flat.transpose(1, 2)).view(b, n, k, m).transpose(1, 2).reshape(b * k, n, m)
    rows, cols = assign(sim, m_mask[:, None].expand(b, k, n).reshape(b * k, n), e_mask.reshape(b * k, m))
    e_pairs = e_local.reshape(b * k, m, d)
    w_m = _weights(m_mask, m_local.dtype)[:, None].expand(b, k, n).reshape(b * k, n)
    w_e = _weights(e_mask.reshape(b * k, m), e_local.dtype)
    step = max(1, chunk // max(k, 1))  # mentions per chunk
    m_ctx, e_ctx = [], []
    for i in range(0, b, step):
        j = min(i + step, b)
        p = slice(i * k, j * k)
        # Mention side: x = m_local + rows @ e_local for each pair (m_local shared by a mention's K pairs).
        x = torch.bmm(rows[p], e_pairs[p]).view(j - i, k, n, d).add_(m_local[i:j, None])
        m_ctx.append(_pool(x.view(-1, n, d), w_m[p]))
        # Entity side: x = e_local + cols^T @ m_local, one GEMM per mention over its K candidates.
        cols_t = cols[p].view(j - i, k, n, m).transpose(2, 3).reshape(j - i, k * m, n)
        x = torch.baddbmm(e_flat[i:j], cols_t, m_local[i:j])
        e_ctx.append(_pool(x.view(-1, m, d), w_e[p]))
    mc = torch.cat(m_ctx).view(b, k, d)
    ec = torch.cat(e_ctx).view(b, k, d)
    return ((e_glob * mc).sum(-1) + (m_glob[:, None] * ec).sum(-1)) / 2


def _weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """masked_mean's weights: mask / count (0 where masked; an all-masked row stays 0)."""
    w = mask.to(dtype)
    return w / w.sum(-1, keepdim=True).clamp_min(1.0)


def _pool(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.normalize(sum_i weight_i * plain_norm(x)_i) for x [C, R, d], weight [C, R] -> [C, d], in 3 passes over x.

    With mean_i and var_i of x_i over d (var_i = |x_i|^2 / d - mean_i^2) and s_i = sqrt(var_i + 1e-5) (plain_norm's):
        sum_i w_i (x_i - mean_i) / s_i  =  sum_i (w_i / s_i) x_i  -  sum_i (w_i mean_i / s_i)
    x is read by a mean, a norm (vectorised one-pass reductions; torch's var_mean is a far slower Welford loop
    on CPU) and a batched row-vector product, instead of materialising plain_norm(x).
    """
    d = x.shape[-1]
    mean = x.mean(-1)
    var = (torch.linalg.vector_norm(x, dim=-1).square() / d - mean.square()).clamp_min(0.0)
    c = weight / torch.sqrt(var + 1e-5)  # [C, R]
    pooled = torch.bmm(c[:, None, :], x)[:, 0] - (c * mean).sum(-1, keepdim=True)
    return F.normalize(pooled, dim=-1)


class SoftPool(nn.Module):
    """Learned soft pooling: weights = softmax over valid items of a linear score."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, N, d], [B, N] -> [B, d]
        w = self.score(x).squeeze(-1).masked_fill(~mask, _NEG)
        return (torch.softmax(w, dim=-1).unsqueeze(-1) * x).sum(-2)


class ItemHead(nn.Module):
    """Backbone features of one side (mentions or entities) -> `ItemEncoding`."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.cfg = cfg
        self.text_in = nn.LayerNorm(cfg.text_dim)
        self.text_local = nn.Linear(cfg.text_dim, d)
        self.text_global = nn.Sequential(nn.Linear(2 * cfg.text_dim, cfg.mlp), nn.GELU(), nn.Linear(cfg.mlp, d))
        self.drop = nn.Dropout(cfg.dropout)  # no parameters: checkpoints load either way
        self.image_in = nn.LayerNorm(cfg.image_dim)
        self.image_local = nn.Linear(cfg.image_dim, d)
        self.image_global = nn.Linear(cfg.image_dim, d)
        self.pool_text = SoftPool(d)
        self.pool_image = SoftPool(d)
        # The backbone's features of an all-zero image: what a missing image looks like (set by training).
        self.register_buffer("blank_global", torch.zeros(cfg.image_dim))
        self.register_buffer("blank_patches", torch.zeros(cfg.image_patches, cfg.image_dim))
        self.dense_images = False  # True for export: no data-dependent indexing in the graph

    def forward(self, tokens: torch.Tensor, text_mask: torch.Tensor, first_mask: torch.Tensor,
                image_global: torch.Tensor | None, image_patches: torch.Tensor | None,
                image_present: torch.Tensor | None, assign: Assignment) -> ItemEncoding:
        """tokens [B, T, Dt]; text_mask, first_mask [B, T] bool (content tokens; those of the first text,
        i.e. the mention or the entity name); image_global [B, Di]; image_patches [B, P, Di]; image_present [B].
        No image inputs (None): no item has an image (`forward_blank`)."""
        if image_global is None or image_patches is None or image_present is None:
            return self.forward_blank(tokens, text_mask, first_mask, assign)
        image_local, g_image = self._image(image_global, image_patches, image_present)
        return self._encode(tokens, text_mask, first_mask, image_local, g_image, image_present, assign)

    def forward_blank(self, tokens: torch.Tensor, text_mask: torch.Tensor, first_mask: torch.Tensor,
                      assign: Assignment) -> ItemEncoding:
        """`forward` for items none of which has an image: the blank image's features, projected once (constants
        in an ONNX export) instead of from an all-zero input on every row; the same values as `forward`."""
        b = tokens.shape[0]
        blank_local, blank_global = self._blank()
        absent = torch.zeros(b, dtype=torch.bool, device=tokens.device)
        return self._encode(tokens, text_mask, first_mask, blank_local.expand(b, -1, -1),
                            blank_global.expand(b, -1), absent, assign)

    def _encode(self, tokens: torch.Tensor, text_mask: torch.Tensor, first_mask: torch.Tensor,
                image_local: torch.Tensor, g_image: torch.Tensor, image_present: torch.Tensor,
                assign: Assignment) -> ItemEncoding:
        x = self.text_in(tokens)
        text_local = F.normalize(self.text_local(x), dim=-1) * text_mask.unsqueeze(-1)
        # Surface form and whole text pooled apart: the name carries much of the signal.
        pooled = torch.cat([masked_mean(x, first_mask), masked_mean(x, text_mask)], dim=-1)
        g_text = F.normalize(self.text_global(self.drop(pooled)), dim=-1)

        # Fusion unit: text tokens and image patches exchange values through the assignment, both ways.
        patch_mask = torch.ones(image_local.shape[:2], dtype=torch.bool, device=image_local.device)
        sim = text_local @ image_local.transpose(-1, -2)  # [B, T, P]
        rows, cols = assign(sim, text_mask, patch_mask)
        fused_text = transport_context(text_local, image_local, rows)  # [B, T, d]
        fused_image = transport_context(image_local, text_local, cols.transpose(-1, -2))  # [B, P, d]
        f_it = F.normalize(self.pool_text(fused_text, text_mask), dim=-1)
        f_ti = F.normalize(self.pool_image(fused_image, patch_mask), dim=-1)
        return ItemEncoding(text_local, text_mask, image_local, g_text, g_image, f_it, f_ti, rows, cols,
                            image_present.to(torch.bool))


    def _blank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The blank image's (locals [P, d], global [d]): what a missing image looks like."""
        blank_local = F.normalize(self.image_local(self.image_in(self.blank_patches)), dim=-1)
        blank_global = F.normalize(self.image_global(self.image_in(self.blank_global)), dim=-1)
        return blank_local, blank_global

    def _image(self, image_global: torch.Tensor, image_patches: torch.Tensor,
               present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image locals [B, P, d], image global [B, d]); rows without an image get the blank image's."""
        blank_local, blank_global = self._blank()
        if self.dense_images:  # one static graph (ONNX export): project every row, then select
            local = F.normalize(self.image_local(self.image_in(image_patches)), dim=-1)
            glob = F.normalize(self.image_global(self.image_in(image_global)), dim=-1)
            p = present.view(-1, 1)
            return torch.where(p.unsqueeze(-1), local, blank_local), torch.where(p, glob, blank_global)
        # Training and KB passes: images are rare, so project only the rows that have one.
        b = present.shape[0]
        local = blank_local.expand(b, -1, -1).clone()
        glob = blank_global.expand(b, -1).clone()
        idx = torch.nonzero(present).flatten()
        if len(idx):
            local[idx] = F.normalize(self.image_local(self.image_in(image_patches[idx])), dim=-1)
            glob[idx] = F.normalize(self.image_global(self.image_in(image_global[idx])), dim=-1)
        return local, glob


@dataclass
class UnitScores:
    text: torch.Tensor  # [B, C]
    visual: torch.Tensor
    fusion: torch.Tensor
    separable: torch.Tensor  # the retrieval dot product
    overall: torch.Tensor
    text_plans: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, cols of aligned pairs (distillation)


class OTMELModel(nn.Module):
    """Mention head + entity head + the three units; subclasses fix the assignment."""

    def __init__(self, cfg: HeadConfig, assign: Assignment) -> None:
        super().__init__()
        self.cfg = cfg
        self.assign = assign
        self.mention = ItemHead(cfg)
        self.entity = ItemHead(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def encode_mentions(self, *features: torch.Tensor) -> ItemEncoding:
        return self.mention(*features, assign=self.assign)

    def encode_entities(self, *features: torch.Tensor) -> ItemEncoding:
        return self.entity(*features, assign=self.assign)

    def g2l_text(self, m: ItemEncoding, e: ItemEncoding, *, pairwise: bool = True) -> tuple[torch.Tensor, ...]:
        return cross_g2l(m.text_local, m.text_mask, m.g_text, e.text_local, e.text_mask, e.g_text, self.assign,
                         pairwise=pairwise)

    def g2l_visual(self, m: ItemEncoding, e: ItemEncoding, *, pairwise: bool = True) -> torch.Tensor:
        pm = torch.ones(m.image_local.shape[:2], dtype=torch.bool, device=m.image_local.device)
        pe = torch.ones(e.image_local.shape[:2], dtype=torch.bool, device=e.image_local.device)
        return cross_g2l(m.image_local, pm, m.g_image, e.image_local, pe, e.g_image, self.assign, pairwise=pairwise)[0]

    def _g2l_visual_pairs(self, m: ItemEncoding, e: ItemEncoding) -> torch.Tensor:
        """g2l_visual of aligned pairs [B]. Every pair with neither image is the blank image against the blank
        image, one value: it is solved once and shared (images are rare, and the 49 x 49 plans are the costliest
        part of a training step), exactly as the served reranker does."""
        has = m.image_present | e.image_present
        if bool(has.all()):
            return self.g2l_visual(m, e, pairwise=False)
        with_image = torch.nonzero(has).flatten()
        todo = torch.cat([with_image, torch.nonzero(~has).flatten()[:1]])  # + one blank pair, last
        ones = torch.ones(len(todo), m.image_local.shape[1], dtype=torch.bool, device=m.image_local.device)
        vis = cross_g2l(m.image_local[todo], ones, m.g_image[todo], e.image_local[todo],
                        torch.ones(len(todo), e.image_local.shape[1], dtype=torch.bool, device=ones.device),
                        e.g_image[todo], self.assign, pairwise=False)[0]
        pick = torch.full(has.shape, len(todo) - 1, dtype=torch.long, device=vis.device)
        pick[with_image] = torch.arange(len(with_image), device=vis.device)
        return vis[pick]

    def candidate_scores(self, m: ItemEncoding, e: ItemEncoding, cand: torch.Tensor) -> UnitScores:
        """Scores of each mention against its own candidate entities: cand [B, K] rows of e -> [B, K].

        The cross (g2l) terms cost O(N * M * d) per pair, so training solves them for each mention's K
        hardest in-batch entities rather than for every pair in the batch."""
        b, k = cand.shape
        flat = cand.reshape(-1)
        mi = torch.arange(b, device=cand.device).repeat_interleave(k)
        mm, ee = m.select(mi), e.select(flat)
        g2g_t = (mm.g_text * ee.g_text).sum(-1)
        g2g_v = (mm.g_image * ee.g_image).sum(-1)
        fusion = ((mm.f_it * ee.f_it).sum(-1) + (mm.f_ti * ee.f_ti).sum(-1)) / 2
        g2l_t, rows, cols = self.g2l_text(mm, ee, pairwise=False)
        g2l_v = self._g2l_visual_pairs(mm, ee)
        text, visual = (g2g_t + g2l_t) / 2, (g2g_v + g2l_v) / 2
        out = UnitScores(text, visual, fusion, (g2g_t + g2g_v + 2 * fusion) / 6, (text + visual + fusion) / 3)
        for name in ("text", "visual", "fusion", "separable", "overall"):
            setattr(out, name, getattr(out, name).view(b, k))
        out.text_plans = (rows.view(b, k, *rows.shape[1:]), cols.view(b, k, *cols.shape[1:]))
        return out

    def scores(self, m: ItemEncoding, e: ItemEncoding) -> UnitScores:
        """Score matrix [B, C] per unit, every mention against every entity (small sets: the cross terms
        cost O(B * C * N * M * d))."""
        g2g_t = m.g_text @ e.g_text.T
        g2g_v = m.g_image @ e.g_image.T
        fusion = (m.f_it @ e.f_it.T + m.f_ti @ e.f_ti.T) / 2
        g2l_t, _, _ = self.g2l_text(m, e)
        g2l_v = self.g2l_visual(m, e)
        text = (g2g_t + g2l_t) / 2
        visual = (g2g_v + g2l_v) / 2
        separable = (g2g_t + g2g_v + 2 * fusion) / 6
        overall = (text + visual + fusion) / 3
        return UnitScores(text, visual, fusion, separable, overall)


def row_kl(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over valid rows (dim=-1) or columns (dim=-2) of KL(target || pred); target and pred are
    distributions along `dim` (zeros on masked entries)."""
    kl = (target * (torch.log(target.clamp_min(1e-9)) - torch.log(pred.clamp_min(1e-9)))).sum(dim)
    return (kl * mask).sum() / mask.sum().clamp_min(1)
