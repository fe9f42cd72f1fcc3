"""`make train`: the OT-MEL teacher, then the distilled student, on cached frozen backbone features.

  1. cache   MiniLM token states and EfficientNet features for the KB and the benchmark splits (once; the `el train`
             entry point, service/offline/training.py, reads the data and builds `Data`; this module never reads it)
  2. teacher in-batch contrastive cross-entropy per unit (text, visual, fusion), on the overall score and on
             the retrieval (separable) score; hard negatives mined from the current model each epoch
  3. student the same task losses + row- and column-wise KL(teacher plan || student attention) on the text
             cross assignment of each mention with its entity and on both items' fusion assignments; its mention
             side may run fewer backbone layers, the top ones fine-tuned (models/student.py), trained on the
             token states of the layer below them (cached as well)
Early stopping on WikiMEL dev MRR (top-`rerank_k` retrieval, reranked by the model's overall score);
fixed seeds. Writes models/weights/{teacher,student}.pt (+ .json config and metrics), reports/train-log.json
and reports/train.png.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import load_model, save_model
from models.contract import EncoderSpec
from models.feature_cache import CachedItems
from models.otmel import HeadConfig, OTMELModel, row_kl
from models.rank_metrics import rank_metrics
from models.student import OTMELStudent, StudentConfig, layer_config_of
from models.teacher import OTMELTeacher, TeacherConfig

logger = logging.getLogger(__name__)

TRAIN_SPLITS = (("wikimel", "train"), ("richpedia", "train"), ("wikidiverse", "train"))
DEV_SPLIT = ("wikimel", "dev")


@dataclass
class TrainConfig:
    data_dir: Path
    onnx_dir: Path
    cache_dir: Path = Path("artifacts/features")
    weights_dir: Path = Path("models/weights")
    reports_dir: Path = Path("reports")
    train_splits: tuple[tuple[str, str], ...] = TRAIN_SPLITS
    batch_size: int = 64  # mentions per step; their gold entities + hard negatives are the columns
    hard_negatives: int = 2  # per mention, sampled from its mined top `mine_top`
    mine_top: int = 20
    candidates: int = 16  # per mention: the K hardest in-batch entities get the cross (g2l) terms
    teacher_epochs: int = 4
    student_epochs: int = 6
    patience: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    distill_weight: float = 1.0
    student_mention_layers: int = 2  # backbone layers of the student's mention encoder (0 = all, as the teacher)
    student_tuned_layers: int = 1  # the top ones of those fine-tuned with the heads
    tuned_lr: float = 1e-4  # peak learning rate of the fine-tuned backbone layers (the heads use lr)
    retrieval_loss_weight: float = 1.0  # weight of the retrieval (separable) loss among the task losses
    dropout: float = 0.0  # on the pooled text input of the global MLP
    student_only: bool = False  # load the saved teacher and distil a new student
    rerank_k: int = 32  # dev metric: retrieval top-k, reranked by the overall score
    seed: int = 0
    limit: int | None = None  # first N training mentions only (smoke runs)
    dev_limit: int | None = None


@dataclass
class Data:
    kb: CachedItems
    train: CachedItems
    dev: CachedItems
    train_gold: np.ndarray  # [Ntrain] KB row of each training mention's answer
    dev_gold: np.ndarray
    blank: tuple[np.ndarray, np.ndarray]
    # The student's mention inputs (train, dev): the same as train/dev unless its mention side is shallower.
    student_mentions: tuple[CachedItems, CachedItems] | None = None
    inner_bert: torch.nn.Module | None = None  # the torch backbone the inner-layer caches came from

    def mentions(self, student: bool) -> tuple[CachedItems, CachedItems]:
        return self.student_mentions if student and self.student_mentions else (self.train, self.dev)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_mrr: float = -1.0
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- data


def concat_items(parts: list[CachedItems]) -> CachedItems:
    """One CachedItems of several (the training splits), image rows renumbered."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [len(p.image_global) for p in parts[:-1]])
    return CachedItems(
        ids=functools.reduce(operator.iadd, (p.ids for p in parts), []), gold=functools.reduce(operator.iadd, (p.gold for p in parts), []),
        tokens=np.concatenate([p.tokens for p in parts]),
        text_mask=np.concatenate([p.text_mask for p in parts]), first_mask=np.concatenate([p.first_mask for p in parts]),
        image_rows=np.concatenate([np.where(p.image_rows >= 0, p.image_rows + o, -1) for p, o in zip(parts, offsets)]),
        image_global=np.concatenate([p.image_global for p in parts]),
        image_patches=np.concatenate([p.image_patches for p in parts]),
    )


def item_tensors(items: CachedItems, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The head's inputs for rows idx: tokens, text_mask, first_mask, image_global, image_patches, present."""
    order = np.argsort(idx)  # memmap reads are fastest in file order
    rows = idx[order]
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    tokens = torch.from_numpy(np.asarray(items.tokens[rows], dtype=np.float32)[inv])
    img_rows = items.image_rows[idx]
    present = img_rows >= 0
    di = items.image_global.shape[1] if items.image_global.ndim == 2 else 1
    p, dp = items.image_patches.shape[1:] if items.image_patches.ndim == 3 else (1, di)
    ig = np.zeros((len(idx), di), np.float32)
    ip = np.zeros((len(idx), p, dp), np.float32)
    if present.any():
        ig[present] = items.image_global[img_rows[present]]
        ip[present] = items.image_patches[img_rows[present]]
    return (tokens, torch.from_numpy(items.text_mask[idx]), torch.from_numpy(items.first_mask[idx]),
            torch.from_numpy(ig), torch.from_numpy(ip), torch.from_numpy(present))


@torch.no_grad()
def retrieval_vectors(model: OTMELModel, items: CachedItems, side: str, batch: int = 512) -> np.ndarray:
    model.eval()
    enc = model.encode_mentions if side == "mention" else model.encode_entities
    out = []
    for s in range(0, len(items), batch):
        out.append(enc(*item_tensors(items, np.arange(s, min(s + batch, len(items))))).retrieval_vector().numpy())
    return np.concatenate(out)


def top_k(queries: np.ndarray, keys: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k (scores, rows), in chunks to bound memory."""
    scores, rows = [], []
    kt = torch.from_numpy(keys)
    for s in range(0, len(queries), chunk):
        sim = torch.from_numpy(queries[s : s + chunk]) @ kt.T
        v, i = sim.topk(k, dim=1)
        scores.append(v.numpy())
        rows.append(i.numpy())
    return np.concatenate(scores), np.concatenate(rows)


def surface_negatives(data: Data, k: int) -> np.ndarray:
    """Before any training: entities whose name tokens look like the mention's (mean-pooled backbone states)."""

    def pooled(items: CachedItems) -> np.ndarray:
        out = []
        for s in range(0, len(items), 4096):
            t = np.asarray(items.tokens[s : s + 4096], dtype=np.float32)
            m = items.first_mask[s : s + 4096, :, None]
            v = (t * m).sum(1) / np.maximum(m.sum(1), 1)
            out.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6))
        return np.concatenate(out).astype(np.float32)

    return top_k(pooled(data.train), pooled(data.kb), k)[1]


# ---------------------------------------------------------------- training


def _batch_columns(gold: np.ndarray, mined: np.ndarray, h: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Column entity rows for a batch (unique golds + sampled mined negatives) and each mention's label."""
    negs = []
    for g, row in zip(gold, mined):
        pool = row[row != g]
        negs.extend(rng.choice(pool, size=min(h, len(pool)), replace=False).tolist())
    cols, inverse = np.unique(np.concatenate([gold, np.asarray(negs, dtype=gold.dtype)]), return_inverse=True)
    return cols, inverse[: len(gold)]


def _task_loss(model: OTMELModel, m, e, labels: torch.Tensor, k: int):
    scale = model.logit_scale.exp().clamp(max=100.0)
    sep_all = m.retrieval_vector() @ e.retrieval_vector().T  # [B, C]
    loss_sep = F.cross_entropy(scale * sep_all, labels)
    # Each mention's K hardest columns (gold first) get the full units, cross terms included.
    with torch.no_grad():
        ranked = sep_all.detach().clone()
        ranked[torch.arange(len(labels)), labels] = float("inf")
        cand = ranked.topk(min(k, ranked.shape[1]), dim=1).indices  # [B, K], gold at 0
    sc = model.candidate_scores(m, e, cand)
    zero = torch.zeros(len(labels), dtype=torch.long)
    losses = {name: F.cross_entropy(scale * getattr(sc, name), zero) for name in ("text", "visual", "fusion", "overall")}
    losses["retrieval"] = loss_sep
    return losses, sc


def train_model(model: OTMELModel, data: Data, cfg: TrainConfig, *, epochs: int, name: str,
                teacher: OTMELModel | None = None) -> History:
    """Train in place; keeps the weights of the best dev epoch. With a teacher: add the KL distillation terms."""
    rng = np.random.default_rng(cfg.seed)
    tuned = [p for n, p in model.named_parameters() if n.startswith("mention_layers.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("mention_layers.")]
    groups = [{"params": rest, "lr": cfg.lr}] + ([{"params": tuned, "lr": cfg.tuned_lr}] if tuned else [])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    m_train, m_dev = data.mentions(student=teacher is not None)
    n = len(data.train_gold) if cfg.limit is None else min(cfg.limit, len(data.train_gold))
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total, warm = epochs * steps_per_epoch, max(1, epochs * steps_per_epoch // 20)
    # Linear warm-up over 5 % of the steps, then linear decay to a tenth of the peak rate.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, 1.0 - 0.9 * max(0, i - warm) / max(1, total - warm)))
    mined = surface_negatives(data, cfg.mine_top)
    hist, best_state, bad = History(), None, 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(n)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{epochs}", unit="step")
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            gold = data.train_gold[idx]
            cols, labels = _batch_columns(gold, mined[idx], cfg.hard_negatives, rng)
            mf, ef = item_tensors(m_train, idx), item_tensors(data.kb, cols)
            m, e = model.encode_mentions(*mf), model.encode_entities(*ef)
            lab = torch.from_numpy(labels)
            losses, sc = _task_loss(model, m, e, lab, cfg.candidates)
            loss = (sum(v for k, v in losses.items() if k != "retrieval")
                    + cfg.retrieval_loss_weight * losses["retrieval"]) / len(losses)
            if teacher is not None:
                tf = mf if m_train is data.train else item_tensors(data.train, idx)
                kl = _distill_loss(teacher, tf, ef, lab, m, e, sc)
                losses.update(kl)
                loss = loss + cfg.distill_weight * sum(kl.values()) / len(kl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            for key, v in losses.items():
                sums[key] = sums.get(key, 0.0) + float(v.detach())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        metrics = dev_metrics(model, data, cfg, m_dev)
        row = {"epoch": epoch + 1, **{f"loss_{k}": v / steps_per_epoch for k, v in sums.items()}, **metrics,
               "elapsed_s": round(time.perf_counter() - t0, 1)}
        hist.epochs.append(row)
        logger.info("%s epoch %d: %s", name, epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        if metrics["dev_mrr"] > hist.best_mrr:
            hist.best_mrr, hist.best_epoch, bad = metrics["dev_mrr"], epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad > cfg.patience:
                logger.info("%s: early stop after epoch %d (best %d)", name, epoch + 1, hist.best_epoch)
                break
        if epoch + 1 < epochs:  # hard negatives for the next epoch, from the current model
            kb_vec = retrieval_vectors(model, data.kb, "entity")
            mined = top_k(retrieval_vectors(model, _take(m_train, n), "mention"), kb_vec, cfg.mine_top)[1]
            if n < len(data.train_gold):
                mined = np.concatenate([mined, np.zeros((len(data.train_gold) - n, cfg.mine_top), mined.dtype)])
    if best_state is not None:
        model.load_state_dict(best_state)
    hist.seconds = round(time.perf_counter() - t0, 1)
    return hist


def _take(items: CachedItems, n: int) -> CachedItems:
    if n >= len(items):
        return items
    return CachedItems(items.ids[:n], items.gold[:n], items.tokens[:n], items.text_mask[:n], items.first_mask[:n],
                       items.image_rows[:n], items.image_global, items.image_patches)


def _distill_loss(teacher: OTMELModel, mf, ef, labels: torch.Tensor, m, e, sc) -> dict[str, torch.Tensor]:
    """Row- and column-wise KL(teacher plan || student attention): text cross term (mention, gold entity) and
    the fusion assignment of every mention and entity of the batch."""
    with torch.no_grad():
        teacher.eval()
        tm, te = teacher.encode_mentions(*mf), teacher.encode_entities(*ef)
        gold = te.select(labels)
        _, t_rows, t_cols = teacher.g2l_text(tm, gold, pairwise=False)
    s_rows, s_cols = sc.text_plans[0][:, 0], sc.text_plans[1][:, 0]  # gold is candidate 0
    m_mask, e_mask = m.text_mask, e.text_mask[labels]
    out = {
        "kl_text_rows": row_kl(t_rows, s_rows, m_mask, dim=-1),
        "kl_text_cols": row_kl(t_cols, s_cols, e_mask, dim=-2),
    }
    for side, t_enc, s_enc in (("mention", tm, m), ("entity", te, e)):
        patches = torch.ones(s_enc.fusion_rows.shape[0], s_enc.fusion_rows.shape[2], dtype=torch.bool)
        out[f"kl_fusion_{side}_rows"] = row_kl(t_enc.fusion_rows, s_enc.fusion_rows, s_enc.text_mask, dim=-1)
        out[f"kl_fusion_{side}_cols"] = row_kl(t_enc.fusion_cols, s_enc.fusion_cols, patches, dim=-2)
    return out


@torch.no_grad()
def dev_metrics(model: OTMELModel, data: Data, cfg: TrainConfig, dev: CachedItems | None = None) -> dict[str, float]:
    """Retrieval over the whole KB, then the model's overall score on the top `rerank_k` (dev MRR); `dev`: the
    model's own dev mention inputs (default data.dev)."""
    model.eval()
    dev = dev if dev is not None else data.dev
    dev = dev if cfg.dev_limit is None else _take(dev, cfg.dev_limit)
    gold = data.dev_gold[: len(dev)]
    kb_vec = retrieval_vectors(model, data.kb, "entity")
    m_vec = retrieval_vectors(model, dev, "mention")
    sims = m_vec @ kb_vec.T
    # The gold's score must come from the same product: a separately summed one can differ in the last bit
    # and make the gold outrank itself.
    gold_score = sims[np.arange(len(gold)), gold]
    full_rank = 1 + (sims > gold_score[:, None]).sum(1)  # exact rank among all KB entities
    _, cand = top_k(m_vec, kb_vec, cfg.rerank_k)
    ranks = []
    for s in range(0, len(dev), 128):
        idx = np.arange(s, min(s + 128, len(dev)))
        rows = cand[idx]
        uniq, inv = np.unique(rows, return_inverse=True)
        m = model.encode_mentions(*item_tensors(dev, idx))
        e = model.encode_entities(*item_tensors(data.kb, uniq))
        overall = model.candidate_scores(m, e, torch.from_numpy(inv.reshape(rows.shape))).overall.numpy()
        for i, j in enumerate(idx):
            hit = np.flatnonzero(rows[i] == gold[j])
            ranks.append(0 if len(hit) == 0 else 1 + int((overall[i] > overall[i, hit[0]]).sum()))
    retrieval, reranked = rank_metrics(full_rank), rank_metrics(ranks)
    return {"dev_retrieval_h1": retrieval["h@1"], "dev_retrieval_mrr": retrieval["mrr"],
            "dev_h1": reranked["h@1"], "dev_mrr": reranked["mrr"]}


# ---------------------------------------------------------------- entry point


def student_depth(cfg: TrainConfig) -> StudentConfig:
    """The student's mention-side depth; built before any data, so that a bad one fails before minutes of caching."""
    return StudentConfig(mention_layers=cfg.student_mention_layers, tuned_layers=cfg.student_tuned_layers)


def train(cfg: TrainConfig, spec: EncoderSpec, data: Data, depth: StudentConfig, *, cache_s: float = 0.0) -> dict:
    """Train the teacher (unless cfg.student_only), then distil the student, on `data` (cached features, prepared by
    the `el train` entry point: service/offline/training.py); `cache_s`: seconds the caching took, for the log."""
    t0 = time.perf_counter()
    blank_g, blank_p = (torch.from_numpy(a) for a in data.blank)

    head = HeadConfig(text_dim=spec.text_dim, image_dim=max(spec.image_dim, 1), image_patches=max(spec.image_patches, 1),
                      dropout=cfg.dropout)
    common = {"trained_on": [f"{d}-{s}" for d, s in cfg.train_splits], "n_train": len(data.train_gold),
              "seed": cfg.seed, "backbone": spec.name, "date": time.strftime("%Y-%m-%d")}
    log_path = cfg.reports_dir / "train-log.json"
    if cfg.student_only:  # distil a new student from the saved teacher
        teacher = load_model(cfg.weights_dir / "teacher.pt")
        t_hist = History(**json.loads(log_path.read_text())["teacher"]) if log_path.exists() else History()
    else:
        seed_everything(cfg.seed)
        teacher = OTMELTeacher(TeacherConfig(head=head))
        _set_blank(teacher, blank_g, blank_p)
        t_hist = train_model(teacher, data, cfg, epochs=cfg.teacher_epochs, name="teacher")
        save_model(teacher, cfg.weights_dir / "teacher.pt",
                   {"kind": "teacher", **common, "best_epoch": t_hist.best_epoch, "dev_mrr": round(t_hist.best_mrr, 4)})
    seed_everything(cfg.seed + 1)
    student = OTMELStudent(replace(depth, head=head,
                                   layer_config=layer_config_of(data.inner_bert) if data.inner_bert else {}))
    if data.inner_bert is not None:
        student.init_tuned_layers(data.inner_bert.encoder.layer)
    _set_blank(student, blank_g, blank_p)
    s_hist = train_model(student, data, cfg, epochs=cfg.student_epochs, name="student", teacher=teacher)
    save_model(student, cfg.weights_dir / "student.pt",
               {"kind": "student", **common, "best_epoch": s_hist.best_epoch, "dev_mrr": round(s_hist.best_mrr, 4)})
    total = cache_s + time.perf_counter() - t0
    summary = {
        "trained_on": common["trained_on"], "n_train": common["n_train"],
        "dev": f"{DEV_SPLIT[0]}-{DEV_SPLIT[1]}", "cache_s": round(cache_s, 1),
        "total_s": round(total + (t_hist.seconds if cfg.student_only else 0.0), 1),
        "teacher": asdict(t_hist), "student": asdict(s_hist), "config": {k: str(v) for k, v in asdict(cfg).items()},
        "encoder_signature": spec.signature(),
    }
    cfg.reports_dir.mkdir(parents=True, exist_ok=True)
    (cfg.reports_dir / "train-log.json").write_text(json.dumps(summary, indent=2))
    plot_history(summary, cfg.reports_dir / "train.png")
    logger.info("training done in %.0fs (teacher dev MRR %.4f, student %.4f)", total, t_hist.best_mrr, s_hist.best_mrr)
    return summary


def _set_blank(model: OTMELModel, blank_g: torch.Tensor, blank_p: torch.Tensor) -> None:
    for head in (model.mention, model.entity):
        head.blank_global.copy_(blank_g)
        head.blank_patches.copy_(blank_p)


def plot_history(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("teacher", "-"), ("student", "--")):
        rows = summary[name]["epochs"]
        ep = [r["epoch"] for r in rows]
        for key in ("loss_overall", "loss_retrieval", "loss_text"):
            axes[0].plot(ep, [r.get(key, np.nan) for r in rows], style, marker="o", label=f"{name} {key[5:]}")
        for key in ("dev_mrr", "dev_h1", "dev_retrieval_mrr"):
            axes[1].plot(ep, [r[key] for r in rows], style, marker="o", label=f"{name} {key[4:]}")
    axes[0].set(title="training losses (epoch mean)", xlabel="epoch")
    axes[1].set(title="WikiMEL dev (40,942-entity KB)", xlabel="epoch")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
