"""OT-MEL matching units (models/otmel.py, teacher.py, student.py) checked from first principles: Sinkhorn and
attention assignments (normalisation, masking, marginals, a planted permutation), the cross global-to-local
term, the item heads (unit norms, the blank image, dense image path), score matrices and the KL helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.otmel import (
    Assignment,
    OTMELModel,
    attention_assignment,
    candidate_g2l,
    cross_g2l,
    masked_mean,
    pooled_context,
    row_kl,
    sinkhorn_assignment,
    transport_context,
)
from models.student import OTMELStudent
from models.teacher import OTMELTeacher

ASSIGNMENTS = {"sinkhorn": sinkhorn_assignment(0.05, 10), "attention": attention_assignment(0.05)}
UNITS = ("text", "visual", "fusion", "separable", "overall")


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def _masks(b: int, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column masks with some padding; every item keeps at least one valid entry."""
    mask_r = torch.ones(b, n, dtype=torch.bool)
    mask_c = torch.ones(b, m, dtype=torch.bool)
    mask_r[0, n - 2:] = False
    mask_r[-1, 0] = False
    mask_c[1, m - 3:] = False
    mask_c[-1, 1] = False
    return mask_r, mask_c


def _cosines(b: int, n: int, m: int, d: int = 16) -> torch.Tensor:
    return _unit(b, n, d) @ _unit(b, m, d).transpose(-1, -2)


def _check_normalised(rows: torch.Tensor, cols: torch.Tensor, mask_r: torch.Tensor, mask_c: torch.Tensor) -> None:
    valid = mask_r.unsqueeze(-1) & mask_c.unsqueeze(-2)
    assert torch.all(rows[~valid] == 0) and torch.all(cols[~valid] == 0)
    assert torch.all(rows >= 0) and torch.all(cols >= 0)
    torch.testing.assert_close(rows.sum(-1)[mask_r], torch.ones(int(mask_r.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(cols.sum(-2)[mask_c], torch.ones(int(mask_c.sum())), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- assignments


def test_sinkhorn_normalised_masked_and_uniform_marginals() -> None:
    torch.manual_seed(0)
    sim = _cosines(4, 6, 5)
    mask_r, mask_c = _masks(4, 6, 5)
    rows, cols = sinkhorn_assignment(0.05, 200)(sim, mask_r, mask_c)
    _check_normalised(rows, cols, mask_r, mask_c)
    # At convergence the plan has marginals 1/n_r (rows) and 1/n_c (columns); cols = plan * n_c and
    # rows = plan * n_r, so each valid row of cols sums to n_c / n_r and each valid column of rows to n_r / n_c.
    nr, nc = mask_r.sum(-1, keepdim=True).float(), mask_c.sum(-1, keepdim=True).float()
    torch.testing.assert_close(cols.sum(-1)[mask_r], (nc / nr).expand_as(mask_r)[mask_r], atol=1e-3, rtol=0)
    torch.testing.assert_close(rows.sum(-2)[mask_c], (nr / nc).expand_as(mask_c)[mask_c], atol=1e-3, rtol=0)


def test_sinkhorn_recovers_planted_permutation_despite_attractive_padding() -> None:
    torch.manual_seed(1)
    b, n = 3, 7
    perm = torch.stack([torch.randperm(n) for _ in range(b)])
    sim = torch.ones(b, n + 2, n + 2)  # padded rows/columns look like perfect matches: masking must hide them
    sim[:, :n, :n] = 0.1 * (2 * torch.rand(b, n, n) - 1)
    sim[torch.arange(b)[:, None], torch.arange(n), perm] = 1.0
    mask = torch.arange(n + 2).expand(b, -1) < n
    rows, cols = sinkhorn_assignment(0.01, 100)(sim, mask, mask)
    _check_normalised(rows, cols, mask, mask)
    assert torch.equal(rows[:, :n, :n].argmax(-1), perm)
    assert torch.equal(cols[:, :n, :n].argmax(-2), torch.argsort(perm, dim=-1))  # inverse permutation
    assert torch.all(rows[:, :n, :n].amax(-1) > 0.99)


def test_sinkhorn_all_masked_rows_are_zero_not_nan() -> None:
    torch.manual_seed(2)
    sim = _cosines(3, 5, 4)
    mask_r, mask_c = _masks(3, 5, 4)
    mask_r[0] = False  # an item with no valid rows
    mask_c[2] = False  # and one with no valid columns
    rows, cols = sinkhorn_assignment(0.05, 20)(sim, mask_r, mask_c)
    assert torch.isfinite(rows).all() and torch.isfinite(cols).all()
    assert torch.all(rows[0] == 0) and torch.all(cols[2] == 0)
    _check_normalised(rows[1:2], cols[1:2], mask_r[1:2], mask_c[1:2])


def test_sinkhorn_plan_is_detached() -> None:
    torch.manual_seed(3)
    sim = _cosines(2, 4, 5).requires_grad_(True)
    rows, cols = sinkhorn_assignment(0.05, 10)(sim, *_masks(2, 4, 5))
    assert not rows.requires_grad and not cols.requires_grad


def _release_sinkhorn_assignment(eps: float, iters: int) -> Assignment:
    """A copy of the teacher's assignment before it moved onto models/sinkhorn.py (its own fixed-iteration loop,
    log(0) = -1e4): the reference that the shared solver's fixed-iteration mode must reproduce."""
    neg = -1e4

    def assign(sim: torch.Tensor, mask_r: torch.Tensor, mask_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = mask_r.unsqueeze(-1) & mask_c.unsqueeze(-2)
        logk = torch.where(valid, (sim.float() - 1.0) / eps, torch.full_like(sim, neg, dtype=torch.float32))
        log_a = torch.where(mask_r, -torch.log(mask_r.sum(-1, keepdim=True).clamp_min(1).float()), torch.tensor(neg))
        log_b = torch.where(mask_c, -torch.log(mask_c.sum(-1, keepdim=True).clamp_min(1).float()), torch.tensor(neg))
        f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)
        for _ in range(iters):
            f = log_a - torch.logsumexp(logk + g.unsqueeze(-2), dim=-1)
            g = log_b - torch.logsumexp(logk + f.unsqueeze(-1), dim=-2)
        plan = torch.exp(logk + f.unsqueeze(-1) + g.unsqueeze(-2)) * valid
        return plan / plan.sum(-1, keepdim=True).clamp_min(1e-30), plan / plan.sum(-2, keepdim=True).clamp_min(1e-30)

    return assign


@pytest.mark.parametrize(("eps", "iters"), [(0.05, 10), (0.05, 3), (0.05, 0), (0.01, 50), (0.1, 1), (0.02, 200)])
def test_sinkhorn_reproduces_the_release_fixed_iteration_loop(eps: float, iters: int) -> None:
    """The teacher's numbers do not move: same rows/cols as the old loop (unconverged counts included), on 4-D
    (pairwise) inputs with padding and items without valid rows or columns."""
    torch.manual_seed(7)
    sim = _unit(6, 3, 13, 16) @ _unit(6, 3, 11, 16).transpose(-1, -2)
    mask_r, mask_c = torch.rand(6, 3, 13) > 0.3, torch.rand(6, 3, 11) > 0.3
    mask_r[0, 0], mask_c[1, 1] = False, False
    want = _release_sinkhorn_assignment(eps, iters)(sim, mask_r, mask_c)
    got = sinkhorn_assignment(eps, iters)(sim, mask_r, mask_c)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=0)


def test_attention_is_masked_softmax() -> None:
    torch.manual_seed(4)
    t = 0.1
    sim = _cosines(4, 6, 5).requires_grad_(True)
    mask_r, mask_c = _masks(4, 6, 5)
    rows, cols = attention_assignment(t)(sim, mask_r, mask_c)
    _check_normalised(rows, cols, mask_r, mask_c)
    assert rows.requires_grad  # the student learns through its attention
    full = torch.ones_like(mask_r), torch.ones_like(mask_c)
    rows_u, cols_u = attention_assignment(t)(sim, *full)
    torch.testing.assert_close(rows_u, torch.softmax(sim / t, dim=-1))
    torch.testing.assert_close(cols_u, torch.softmax(sim / t, dim=-2))
    # A masked row equals the softmax over its valid columns only.
    valid_c = mask_c[1]
    torch.testing.assert_close(rows[1, 2, valid_c], torch.softmax(sim[1, 2, valid_c] / t, dim=-1))


# ---------------------------------------------------------------- cross term


@pytest.mark.parametrize("name", sorted(ASSIGNMENTS))
def test_cross_g2l_pairwise_equals_aligned_and_ignores_padding(name: str) -> None:
    torch.manual_seed(5)
    assign: Assignment = ASSIGNMENTS[name]
    b, c, n, m, d = 3, 4, 6, 5, 16
    m_mask, e_mask = _masks(b, n, m)[0], _masks(c, n, m)[1]
    m_local, e_local = _unit(b, n, d), _unit(c, m, d)
    m_glob, e_glob = _unit(b, d), _unit(c, d)
    g2l, rows, cols = cross_g2l(m_local, m_mask, m_glob, e_local, e_mask, e_glob, assign)
    assert g2l.shape == (b, c) and rows.shape == cols.shape == (b, c, n, m)
    assert torch.all(g2l.abs() <= 1 + 1e-6)
    bi, ci = (x.reshape(-1) for x in torch.meshgrid(torch.arange(b), torch.arange(c), indexing="ij"))
    g2l_a, rows_a, cols_a = cross_g2l(m_local[bi], m_mask[bi], m_glob[bi], e_local[ci], e_mask[ci], e_glob[ci],
                                      assign, pairwise=False)
    torch.testing.assert_close(g2l.reshape(-1), g2l_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.reshape(-1, n, m), rows_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(cols.reshape(-1, n, m), cols_a, atol=1e-5, rtol=0)
    m_pad, e_pad = m_local.clone(), e_local.clone()
    m_pad[~m_mask] = 5 * torch.randn(int((~m_mask).sum()), d)
    e_pad[~e_mask] = 5 * torch.randn(int((~e_mask).sum()), d)
    g2l_p, _, _ = cross_g2l(m_pad, m_mask, m_glob, e_pad, e_mask, e_glob, assign)
    torch.testing.assert_close(g2l_p, g2l, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_pooled_context_is_the_direct_form(chunk: int) -> None:
    torch.manual_seed(8)
    b, n, m, d = 7, 6, 5, 16
    mask, _ = _masks(b, n, m)
    target, source = _unit(b, n, d) * mask[..., None], _unit(b, m, d)
    rows = torch.softmax(3 * torch.randn(b, n, m), -1) * mask[..., None]
    want = F.normalize(masked_mean(transport_context(target, source, rows), mask), dim=-1)
    torch.testing.assert_close(pooled_context(target, source, rows, mask, chunk=chunk), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(ASSIGNMENTS))
@pytest.mark.parametrize("chunk", [1, 5, 128])
def test_fast_paths_equal_cross_g2l(name: str, chunk: int) -> None:
    """The serving paths (cross_g2l fast=True, candidate_g2l over each mention's own candidates) give cross_g2l's
    values on the aligned pairs, padding and a candidate without tokens included."""
    torch.manual_seed(9)
    assign: Assignment = ASSIGNMENTS[name]
    b, k, n, m, d = 3, 4, 6, 5, 16
    m_mask, _ = _masks(b, n, m)
    e_mask = _masks(b * k, n, m)[1]
    e_mask[5] = False  # a missing candidate: no tokens
    m_local, e_local = _unit(b, n, d) * m_mask[..., None], _unit(b * k, m, d) * e_mask[..., None]
    m_glob, e_glob = _unit(b, d), _unit(b * k, d)
    qi = torch.arange(b).repeat_interleave(k)
    want, _, _ = cross_g2l(m_local[qi], m_mask[qi], m_glob[qi], e_local, e_mask, e_glob, assign, pairwise=False)
    fast, _, _ = cross_g2l(m_local[qi], m_mask[qi], m_glob[qi], e_local, e_mask, e_glob, assign, pairwise=False,
                           fast=True)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=0)
    got = candidate_g2l(m_local, m_mask, m_glob, e_local.view(b, k, m, d), e_mask.view(b, k, m),
                        e_glob.view(b, k, d), assign, chunk=chunk)
    assert got.shape == (b, k)
    torch.testing.assert_close(got.reshape(-1), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- heads and scores


def _model(kind: str) -> OTMELModel:
    torch.manual_seed(6)
    model = OTMELTeacher() if kind == "teacher" else OTMELStudent()
    for head in (model.mention, model.entity):  # a non-trivial blank image
        head.blank_global.copy_(torch.randn_like(head.blank_global))
        head.blank_patches.copy_(torch.randn_like(head.blank_patches))
    return model.eval()


def _inputs(b: int, seed: int, present: list[bool], t: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    pos = torch.arange(t).expand(b, -1)
    text_mask = pos < lengths[:, None]
    first_mask = text_mask & (pos < 2)
    return [torch.randn(b, t, 384, generator=g), text_mask, first_mask, torch.randn(b, 1280, generator=g),
            torch.randn(b, 49, 1280, generator=g), torch.tensor(present)]


MENTIONS = {"b": 4, "seed": 10, "present": [True, False, True, False]}
ENTITIES = {"b": 5, "seed": 11, "present": [False, True, False, True, False]}
KINDS = ["teacher", "student"]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_encodings_are_unit_norm(kind: str) -> None:
    model = _model(kind)
    for enc in (model.encode_mentions(*_inputs(**MENTIONS)), model.encode_entities(*_inputs(**ENTITIES))):
        for vec in (enc.g_text, enc.g_image, enc.f_it, enc.f_ti):
            torch.testing.assert_close(vec.norm(dim=-1), torch.ones(vec.shape[0]))
        norms = enc.text_local.norm(dim=-1)
        torch.testing.assert_close(norms[enc.text_mask], torch.ones(int(enc.text_mask.sum())))
        assert torch.all(norms[~enc.text_mask] == 0)
        torch.testing.assert_close(enc.image_local.norm(dim=-1), torch.ones(enc.image_local.shape[:2]))


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_scores_consistency(kind: str) -> None:
    model = _model(kind)
    m, e = model.encode_mentions(*_inputs(**MENTIONS)), model.encode_entities(*_inputs(**ENTITIES))
    full = model.scores(m, e)
    assert full.overall.shape == (4, 5)
    torch.testing.assert_close(m.retrieval_vector() @ e.retrieval_vector().T, full.separable, atol=1e-5, rtol=0)
    # overall = separable + (g2l_T + g2l_V) / 6 (module docstring)
    g2l = model.g2l_text(m, e)[0] + model.g2l_visual(m, e)
    torch.testing.assert_close(full.overall, full.separable + g2l / 6, atol=1e-5, rtol=0)
    cand = torch.tensor([[0, 3, 4], [1, 1, 2], [4, 0, 2], [3, 2, 1]])
    sub = model.candidate_scores(m, e, cand)
    for unit in UNITS:
        torch.testing.assert_close(getattr(sub, unit), getattr(full, unit).gather(1, cand), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_blank_pair_gives_the_same_gradients(kind: str) -> None:
    """candidate_scores solves the visual term of blank-against-blank pairs once; values and gradients must
    equal solving every pair."""
    cand = torch.tensor([[0, 3, 4], [1, 1, 2], [4, 0, 2], [3, 2, 1]])  # blank against blank: (1, 2) and (3, 2)
    grads = []
    for shared in (True, False):
        model = _model(kind)
        m, e = model.encode_mentions(*_inputs(**MENTIONS)), model.encode_entities(*_inputs(**ENTITIES))
        if shared:
            visual = model.candidate_scores(m, e, cand).visual
        else:
            mm, ee = m.select(torch.arange(4).repeat_interleave(3)), e.select(cand.reshape(-1))
            g2g = (mm.g_image * ee.g_image).sum(-1)
            visual = ((g2g + model.g2l_visual(mm, ee, pairwise=False)) / 2).view(4, 3)
        (visual * torch.arange(12.0).view(4, 3)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("image_local" in n for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_missing_image_is_the_blank(kind: str) -> None:
    model = _model(kind)
    feats = _inputs(**MENTIONS)  # rows 1 and 3 have no image
    enc = model.encode_mentions(*feats)
    torch.testing.assert_close(enc.image_local[1], enc.image_local[3], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.g_image[1], enc.g_image[3], atol=1e-6, rtol=0)
    assert not torch.allclose(enc.g_image[0], enc.g_image[1], atol=1e-3)  # a real image differs from the blank
    other = [x.clone() for x in feats]
    other[3][[1, 3]] = 7 * torch.randn(2, 1280)
    other[4][[1, 3]] = 7 * torch.randn(2, 49, 1280)
    enc2 = model.encode_mentions(*other)
    for field in ("image_local", "g_image", "f_it", "f_ti"):
        torch.testing.assert_close(getattr(enc2, field), getattr(enc, field), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_dense_images_match_sparse(kind: str) -> None:
    model = _model(kind)
    feats = _inputs(**ENTITIES)
    sparse = model.encode_entities(*feats)
    model.entity.dense_images = True
    dense = model.encode_entities(*feats)
    for field in ("text_local", "image_local", "g_text", "g_image", "f_it", "f_ti", "fusion_rows", "fusion_cols"):
        torch.testing.assert_close(getattr(dense, field), getattr(sparse, field), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- KL helper


def test_row_kl() -> None:
    torch.manual_seed(7)
    sim = _cosines(3, 6, 5)
    mask_r, mask_c = _masks(3, 6, 5)
    t_rows, t_cols = sinkhorn_assignment(0.05, 10)(sim, mask_r, mask_c)
    s_rows, s_cols = attention_assignment(0.2)(sim, mask_r, mask_c)
    assert row_kl(t_rows, t_rows, mask_r, dim=-1).abs() < 1e-7
    assert row_kl(t_cols, t_cols, mask_c, dim=-2).abs() < 1e-7
    kl_r, kl_c = row_kl(t_rows, s_rows, mask_r, dim=-1), row_kl(t_cols, s_cols, mask_c, dim=-2)
    assert torch.isfinite(kl_r) and kl_r > 1e-3 and torch.isfinite(kl_c) and kl_c > 1e-3
    # Mean over valid rows only, computed by hand on the valid block of each row.
    by_hand = torch.stack([(t_rows[b, i, mask_c[b]] * (t_rows[b, i, mask_c[b]] / s_rows[b, i, mask_c[b]]).log()).sum()
                           for b in range(3) for i in range(6) if mask_r[b, i]]).mean()
    torch.testing.assert_close(kl_r, by_hand, atol=1e-5, rtol=1e-4)
    # Masked rows (and columns) do not count, whatever they hold.
    pred_r, pred_c = s_rows.clone(), s_cols.clone()
    pred_r[~mask_r] = torch.softmax(5 * torch.randn(int((~mask_r).sum()), 5), dim=-1)
    pred_c.transpose(-1, -2)[~mask_c] = torch.softmax(5 * torch.randn(int((~mask_c).sum()), 6), dim=-1)
    targ_r = t_rows.clone()
    targ_r[~mask_r] = torch.softmax(torch.randn(int((~mask_r).sum()), 5), dim=-1)
    torch.testing.assert_close(row_kl(targ_r, pred_r, mask_r, dim=-1), kl_r)
    torch.testing.assert_close(row_kl(t_cols, pred_c, mask_c, dim=-2), kl_c)
