"""Build a versioned index directory from a KG.

    folder/manifest.json        what, when, from which KG source (file sizes and hashes), encoder signature,
                                dims, counts, file checksums
    folder/faiss.index          global vectors (inner product)
    folder/ids.json             row -> entity id (the id map)
    folder/entities.jsonl       row-ordered metadata: id, name, description, has_image
                                (start_year, end_year when the KG states them)
    folder/projections.npz      zero-shot only: backbone -> stored dims (fitted here, reused for mentions)
    folder/unit_globals.npy     student only: [N, 2, d] fp16 text and image unit globals (OT cross terms)
    folder/image_blank.npy      student only: [P, d] fp16 patch features of the blank (missing) image
    folder/text_local.npy       [N, T, d] fp16 token features for OT   (memory-mapped at serve time)
    folder/text_seg.npy         [N, T]    uint8 segment codes (0 pad, 1 name, 2 attributes)
    folder/image_rows.npy       [N]       int32 row into image_local, -1 when no image
    folder/image_local.npy      [M, P, d] fp16 patch features for OT

The folder is written under a temporary name and renamed into place, so a reader never sees half a build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
from tqdm import tqdm

from kg_index.factory import new_faiss_index
from kg_index.manifest import Manifest, index_files, record_files
from kg_index.records import Entity
from kg_index.source import KGSource
from models.contract import EncoderSpec
from models.features import Featurizer, Projections, StudentFeaturizer
from models.runtime import EncoderRuntime

logger = logging.getLogger(__name__)

FLAT_LIMIT = 100_000  # below this exact search is fast enough (design.md)
PCA_SAMPLE = 2048  # entities encoded up front to fit the token projection


def choose_factory(n: int, factory: str | None) -> str:
    """`factory` when given, else Flat (exact) below FLAT_LIMIT entities and HNSW32,Flat above.

    `el bench-scale` (reports/bench-scale.json: 1M entities, real WikiMEL mention queries) keeps HNSW32: built with
    efConstruction 200 (kg_index/factory.py) it reached recall@32 0.988 at efSearch 128 (set by
    load.configure_search), 0.70 ms a query p50, where IVF4096,Flat needed nprobe 256 and 33 ms for 0.98, and Flat
    about 165 ms; its graph costs ~0.27 GB over the 1.5 GB of vectors (M 32).
    """
    if factory:
        return factory
    return "Flat" if n < FLAT_LIMIT else "HNSW32,Flat"


def load_entity_image(path: Path | None, max_side: int = 224) -> Image.Image | None:
    """KG images are trusted local files, but may be huge: decode at reduced scale and never fail the build."""
    if path is None:
        return None
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max_side, max_side))
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("skipping unreadable image %s (%s)", path, exc.__class__.__name__)
        return None


def _pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comp = vt[:dim].T  # [D, dim]
    if comp.shape[1] < dim:  # fewer samples than dims: pad with orthogonal random directions
        rng = np.random.default_rng(0)
        extra = rng.standard_normal((x.shape[1], dim - comp.shape[1]))
        extra -= comp @ (comp.T @ extra)
        comp = np.concatenate([comp, np.linalg.qr(extra)[0]], axis=1)
    return mean.astype(np.float32), comp.astype(np.float32)


def _random_projection(d_in: int, d_out: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_in, max(d_out, 1))))
    return q[:, :d_out].astype(np.float32)


def fit_projections(runtime: EncoderRuntime, entities: Sequence[Entity], *, local_dim: int, image_global_dim: int,
                    name_weight: float, image_weight: float, batch_size: int) -> Projections:
    """Text: PCA over the token states of a fixed sample of the KG. Image: a fixed random orthonormal map,
    since a KG rarely has enough images to fit one (a JL projection keeps cosines on average)."""
    spec = runtime.spec
    rng = np.random.default_rng(0)
    sample = [entities[i] for i in sorted(rng.choice(len(entities), min(PCA_SAMPLE, len(entities)), replace=False))]
    toks = []
    for i in range(0, len(sample), batch_size):
        chunk = sample[i : i + batch_size]
        f = runtime.encode_texts([e.name for e in chunk], [e.description for e in chunk])
        toks.append(f.tokens[f.mask])
    text_mean, text_proj = _pca(np.concatenate(toks), local_dim)
    di = max(spec.image_dim, 1)
    return Projections(
        text_mean=text_mean, text=text_proj,
        image_mean=np.zeros(di, np.float32),
        image_local=_random_projection(di, local_dim, 1),
        image_global=_random_projection(di, min(image_global_dim, di), 2),
        name_weight=np.float32(name_weight), image_weight=np.float32(image_weight),
    )


def build_index(entities: Sequence[Entity], runtime: EncoderRuntime, out_dir: Path, *, kg: str,
                local_dim: int = 96, image_global_dim: int = 128, name_weight: float = 0.5, image_weight: float = 0.5,
                faiss_factory: str | None = None, batch_size: int = 64, progress: bool = True,
                source: KGSource | None = None) -> Manifest:
    """Encode every entity and write a complete, checksummed index folder at out_dir.

    `source` (kg_index.source.kg_source, taken before the entities were read) is recorded in the manifest so
    that a later build or the service can tell whether the configured KG is still the one indexed.
    """
    if not entities:
        raise ValueError(f"KG {kg!r} has no entities")
    ids = [e.id for e in entities]
    if len(set(ids)) != len(ids):
        raise ValueError(f"KG {kg!r} has duplicate entity ids")
    t0 = time.perf_counter()
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    try:
        manifest = _write_files(entities, runtime, tmp, kg=kg, local_dim=local_dim, image_global_dim=image_global_dim,
                                name_weight=name_weight, image_weight=image_weight, faiss_factory=faiss_factory,
                                batch_size=batch_size, progress=progress, source=source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial build behind
        raise

    # Swap into place: the old folder (if any) is moved aside first, then removed.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("built index %s: %d entities (%d with images), %s, %.1fs", manifest.version, manifest.n_entities,
                manifest.n_images, manifest.faiss_factory, time.perf_counter() - t0)
    return manifest


def _write_files(entities: Sequence[Entity], runtime: EncoderRuntime, tmp: Path, *, kg: str, local_dim: int,
                 image_global_dim: int, name_weight: float, image_weight: float, faiss_factory: str | None,
                 batch_size: int, progress: bool, source: KGSource | None) -> Manifest:
    """Encode the entities and write every index file and the manifest into tmp."""
    spec: EncoderSpec = runtime.spec
    n, t = len(entities), spec.max_tokens
    ids = [e.id for e in entities]
    featurizer: Featurizer | StudentFeaturizer
    unit_globals = None
    if spec.heads:  # the trained student's entity encoder: its own dims, no fitted projections
        featurizer = StudentFeaturizer(runtime, "entity")
        local_dim, global_dim = spec.heads_dim, 4 * spec.heads_dim
        unit_globals = np.zeros((n, 2, local_dim), np.float16)
        blank = featurizer(["-"], [""], [None]).image_local[0]
        np.save(tmp / "image_blank.npy", blank.astype(np.float16))
    else:
        proj = fit_projections(runtime, entities, local_dim=local_dim, image_global_dim=image_global_dim,
                               name_weight=name_weight, image_weight=image_weight, batch_size=batch_size)
        proj.save(tmp / "projections.npz")
        featurizer = Featurizer(runtime, proj)
        global_dim = proj.global_dim

    text_local = np.lib.format.open_memmap(tmp / "text_local.npy", mode="w+", dtype=np.float16, shape=(n, t, local_dim))
    text_seg = np.lib.format.open_memmap(tmp / "text_seg.npy", mode="w+", dtype=np.uint8, shape=(n, t))
    image_rows = np.full(n, -1, dtype=np.int32)
    image_chunks: list[np.ndarray] = []
    globals_ = np.zeros((n, global_dim), np.float32)
    with_image = 0
    for start in tqdm(range(0, n, batch_size), desc="encoding KG", unit="batch", disable=not progress):
        chunk = entities[start : start + batch_size]
        images = [load_entity_image(e.image) for e in chunk]
        f = featurizer([e.name for e in chunk], [e.description for e in chunk], images)
        rows = slice(start, start + len(chunk))
        globals_[rows] = f.global_
        if unit_globals is not None and f.unit_globals is not None:
            unit_globals[rows] = f.unit_globals.astype(np.float16)
        width = f.text_local.shape[1]
        text_local[rows, :width] = f.text_local.astype(np.float16)
        text_seg[rows, :width] = f.text_seg
        for j in np.flatnonzero(f.image_present):
            image_rows[start + j] = with_image
            image_chunks.append(f.image_local[j].astype(np.float16))
            with_image += 1
    text_local.flush()
    text_seg.flush()
    del text_local, text_seg
    np.save(tmp / "image_rows.npy", image_rows)
    if unit_globals is not None:
        np.save(tmp / "unit_globals.npy", unit_globals)
    patches = max(spec.image_patches, 1)
    image_local = np.stack(image_chunks) if image_chunks else np.zeros((0, patches, local_dim), np.float16)
    np.save(tmp / "image_local.npy", image_local)

    factory = choose_factory(n, faiss_factory)
    index = new_faiss_index(global_dim, factory)
    if not index.is_trained:
        index.train(globals_)
    index.add(globals_)
    faiss.write_index(index, str(tmp / "faiss.index"))
    (tmp / "ids.json").write_text(json.dumps(ids))
    with (tmp / "entities.jsonl").open("w") as f:
        for e in entities:
            row = {"id": e.id, "name": e.name, "description": e.description, "has_image": e.image is not None}
            if e.start_year is not None or e.end_year is not None:
                row.update(start_year=e.start_year, end_year=e.end_year)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    built = datetime.now(UTC)
    manifest = Manifest(
        version="", built_at=built.isoformat(timespec="seconds"), kg=kg, encoder=asdict(spec),
        encoder_signature=spec.signature(), n_entities=n, n_images=with_image, global_dim=global_dim,
        local_dim=local_dim, max_tokens=t, image_patches=patches, faiss_factory=factory, heads=spec.heads,
        source=source.to_dict() if source is not None else None,
    )
    record_files(manifest, tmp, list(index_files(spec.heads)))
    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()[:8]
    manifest.version = f"{built:%Y%m%dT%H%M%SZ}-{digest}"
    manifest.write(tmp)
    return manifest
