"""`el bench`: every row on the same WikiMEL test mentions in one run, then ratios, reports/bench.json and the chart.

Rows (each optional part can be skipped; a part whose tool is missing is skipped with a note in `skipped`):
plain bi-encoder (bench_plain) | served Linker in process, batch 1 and batch B, text; batch 1 and B with the
mention images (the mentions that have a local image) | adaptive rerank (EL_RERANK__SKIP_MARGIN) at batch B |
the same with the mention encoder in the other precision (EL_ENCODER__QUANTIZE_INT8: fp32 where int8 is served, as
on CPU by default, int8 where fp32 is) at batch B, with and without the margin |
served over HTTP under wrk (bench_http) | the teacher's exhaustive scoring on the first `teacher_n` mentions |
our Sinkhorn against POT's on the problems captured from one batch of the served reranker (bench_ot).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kg_index.build import load_entity_image
from kg_index.readers import read_mentions
from kg_index.records import Mention
from service.offline.bench import TEACHER, Row, hits_at_1, machine_info, report, time_calls
from service.pipeline.linker import Linker
from service.pipeline.types import LinkQuery

logger = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    n: int = 2000  # WikiMEL test mentions (text rows)
    image_n: int = 256  # mentions with a local image (text + image rows)
    batch: int = 64
    teacher_n: int = 200
    teacher_exhaustive_n: int = 3  # of those, mentions timed with every cross term solved (about 1.5 s each)
    single_n: int = 300  # mentions of the plain bi-encoder's single-request row (batch 1)
    top_k: int = 10
    http_seconds: float = 10.0
    http_concurrency: tuple[int, ...] = (1, 8, 32)
    paired_rounds: int = 3  # alternating in-process / HTTP rounds for the HTTP share (0: none)
    paired_seconds: float = 8.0  # wrk's run per round
    paired_n: int = 1024  # mentions of the in-process arm per round
    http_workers: tuple[int, ...] = (1,)  # HTTP rows for a server of each of these many processes (EL_WORKERS)
    skip_plain: bool = False
    skip_http: bool = False
    skip_teacher: bool = False
    skip_ot: bool = False
    skip_precision: bool = False  # no rows with the mention encoder in the other precision
    cache_dir: Path = Path("artifacts/bench")  # the plain bi-encoder's entity matrix


def _served(linker: Linker, name: str, what: str, mentions: list[Mention], images: list, batch: int, top_k: int,
            teacher_n: int) -> tuple[Row, list[str | None]]:
    queries = [LinkQuery(m.mention, m.context, im, top_k=top_k) for m, im in zip(mentions, images)]
    chunks = [queries[i : i + batch] for i in range(0, len(queries), batch)]
    skipped = 0

    def link(chunk: list[LinkQuery]) -> list[str | None]:
        nonlocal skipped
        out = linker.link_batch(chunk)
        skipped += out.ot_skipped
        return [r.entities[0].id if r.entities else None for r in out.results]

    timed, outs = time_calls(link, chunks, warmup=1 if batch > 1 else 5)
    top1 = [p for o in outs for p in o]
    gold = [m.answer for m in mentions]
    extra = {"skip_margin": linker.skip_margin} if linker.skip_margin is not None else {}
    if linker.skip_margin is not None:
        warm = sum(len(c) for c in chunks[: 1 if batch > 1 else 5])  # the warm-up calls count their skips too
        extra["ot_skipped_share"] = round(skipped / max(len(queries) + warm, 1), 4)
    row = timed.row(name, what, len(mentions), h1=hits_at_1(top1, gold),
                    h1_subset=hits_at_1(top1[:teacher_n], gold[:teacher_n]) if teacher_n else None, batch=batch,
                    extra=extra)
    return row, top1


def other_precision_linker(linker: Linker, cache_dir: Path) -> tuple[Linker | None, str]:
    """The served Linker with its mention encoder in the other precision (fp32 if it serves int8, else int8), on
    the same index object, and that precision's name. Its encoders are exported into `cache_dir`/onnx-<precision>
    (a copy of the served export, redone there once), so the served export is left as it is. None when the int8
    encoder fails its accuracy gate."""
    import shutil

    from models.runtime import EncoderRuntime
    from service.encoders import export_encoders

    want_int8 = not linker.runtime.spec.int8_mentions
    precision = "int8" if want_int8 else "fp32"
    out = cache_dir / f"onnx-{precision}"
    if not (out / "encoder_spec.json").exists():
        shutil.copytree(linker.settings.encoder.onnx_dir, out, dirs_exist_ok=True)
    settings = linker.settings.model_copy(deep=True)
    settings.encoder.onnx_dir, settings.encoder.quantize_int8 = out, want_int8
    runtime: EncoderRuntime = export_encoders(settings)
    if runtime.spec.int8_mentions != want_int8:
        return None, precision
    other = Linker(settings, runtime, linker.index, linker.source_warning)
    return other.with_skip_margin(linker.skip_margin), precision


def _teacher(linker: Linker, data_dir: Path, mentions: list[Mention], full_n: int = 3) -> Row | None:
    """The paper's protocol: the teacher scores every KB entity, every cross term solved, per mention with the KB
    encoded beforehand (as the served index is) and the mention's encoding counted, timed on the first `full_n`
    mentions; H@1 on the whole subset from the exact ranks of the labelled shortcut (the same ranks, checked on
    those). The two shortcuts' rates ride along in `extra` (features cached on a first call)."""
    from service.offline.evaluation_teacher import teacher_exhaustive

    if teacher_exhaustive(linker, data_dir, "wikimel", "test", mentions[:2], timed=False) is None:  # fills the caches
        return None
    out = teacher_exhaustive(linker, data_dir, "wikimel", "test", mentions, full_n=full_n)
    assert out is not None
    ranks, ms, info, _ = out
    h1 = round(sum(r == 1 for r in ranks) / max(len(ranks), 1), 4)
    encode = info["mention_encode_ms_per_mention"]
    rate = lambda ms_per_mention: round(1000 / (ms_per_mention + encode), 2)
    cpu_ms = info["exhaustive_cpu_ms_per_mention"] + info["mention_encode_cpu_ms_per_mention"]
    return Row(TEACHER, f"OT-MEL teacher, every cross term against the {info['kb_entities']} KB entities per mention "
               f"(the paper's protocol), timed on the first {info['exhaustive_n']} mentions, H@1 on the first "
               f"{len(mentions)}", len(mentions), rate(info["exhaustive_ms_per_mention"]), None, None, None,
               round(cpu_ms / 1000, 5), h1=h1, h1_subset=h1,
               extra={**{k: v for k, v in info.items() if k not in ("note", "timings_note")},
                      "top1_bounded_mentions_per_s": rate(info["top1_ms_per_mention"]),
                      "gold_bounded_mentions_per_s": rate(info["scoring_ms_per_mention"]),
                      # As the protocol's row was timed before 2026-12-06: the labelled shortcut, the KB encoding
                      # counted once over the subset, the mentions' encoding not.
                      "gold_bounded_with_kb_encoding_mentions_per_s": round(1000 / ms, 2) if ms else None,
                      "notes": "mentions_per_s: every cross term solved (exhaustive_n mentions), KB encoded "
                               "beforehand, mention encoding counted; top1_bounded: the exact top entity without "
                               "labels, by bounds; gold_bounded: the exact gold rank with the gold's score as the "
                               "bound (needs the labels: a lower bound on the teacher's cost)"})


def run_bench(linker: Linker, data_dir: Path, opts: BenchOptions) -> dict:
    from service.offline import bench_http

    all_mentions = read_mentions(data_dir, "wikimel", "test")
    mentions = all_mentions[: opts.n]
    with_image = [m for m in all_mentions if m.image is not None][: opts.image_n]
    images = [load_entity_image(m.image) for m in with_image]  # decoded up front: the rows time the pipeline
    teacher_n = min(opts.teacher_n, len(mentions)) if not opts.skip_teacher else 0
    rows: list[Row] = []
    skipped: list[str] = []
    http_share = None
    default_workers: int | None = None  # the server processes `el serve` runs here (EL_WORKERS; auto by default)
    http_shares: list[dict] = []  # one per server size (--http-workers)

    if not opts.skip_plain:
        from service.offline.bench_plain import plain_rows

        try:
            rows += plain_rows(linker.index.entities, mentions, cache_dir=opts.cache_dir,
                               key=f"{linker.index.version}", max_tokens=linker.settings.encoder.max_tokens,
                               batch=opts.batch, teacher_n=teacher_n, single_n=min(opts.single_n, len(mentions)))
        except ImportError as exc:
            skipped.append(f"plain bi-encoder: {exc}")

    full = linker.with_skip_margin(None)
    none = [None] * len(mentions)
    b1, top1_b1 = _served(full, "served_b1", "Linker in process, text, batch 1", mentions, none, 1, opts.top_k,
                          teacher_n)
    rows.append(b1)
    rows.append(_served(full, f"served_b{opts.batch}", f"Linker in process, text, batch {opts.batch}", mentions, none,
                        opts.batch, opts.top_k, teacher_n)[0])
    if linker.skip_margin is not None:
        rows.append(_served(linker, f"served_b{opts.batch}_adaptive", f"Linker in process, text, batch {opts.batch}, "
                            f"OT skipped above margin {linker.skip_margin}", mentions, none, opts.batch, opts.top_k,
                            teacher_n)[0])
    if not opts.skip_precision:
        other, precision = other_precision_linker(linker, opts.cache_dir)
        if other is None:
            skipped.append(f"{precision} rows: the int8 mention encoder failed its accuracy gate")
        else:
            other.warm_up()
            rows.append(_served(other.with_skip_margin(None), f"served_b{opts.batch}_{precision}", f"Linker in "
                                f"process, text, batch {opts.batch}, {precision} mention encoder", mentions, none,
                                opts.batch, opts.top_k, teacher_n)[0])
            if linker.skip_margin is not None:
                rows.append(_served(other, f"served_b{opts.batch}_adaptive_{precision}", f"Linker in process, text, "
                                    f"batch {opts.batch}, OT skipped above margin {linker.skip_margin}, {precision} "
                                    "mention encoder", mentions, none, opts.batch, opts.top_k, teacher_n)[0])
    if with_image:
        for b in (1, opts.batch):
            rows.append(_served(full, f"served_image_b{b}", f"Linker in process, text + image ({len(with_image)} "
                                f"mentions with a local image), batch {b}", with_image, images, b, opts.top_k, 0)[0])

    if opts.skip_http:
        skipped.append("HTTP rows: --skip-http")
    elif bench_http.wrk_path() is None:
        skipped.append("HTTP rows: wrk is not installed (Debian: apt-get install wrk)")
        logger.warning("wrk not found: skipping the HTTP rows (Debian: apt-get install wrk)")
    else:
        env = bench_http.server_env(linker.settings, linker.source_warning is not None)
        paired = None
        if opts.paired_rounds:
            paired_queries = [LinkQuery(m.mention, m.context, None, top_k=opts.top_k)
                              for m in mentions[: opts.paired_n]]

            def in_process() -> float:
                t0 = time.perf_counter()
                for i in range(0, len(paired_queries), opts.batch):
                    full.link_batch(paired_queries[i : i + opts.batch])
                return len(paired_queries) / (time.perf_counter() - t0)

            paired = bench_http.Paired(in_process, f"Linker in process, text, batch {opts.batch}, first "
                                       f"{len(paired_queries)} mentions", opts.paired_rounds, opts.paired_seconds)
        from service.prefork import worker_count

        default_workers = worker_count(linker.settings)
        for workers in opts.http_workers:
            http, share = bench_http.http_rows(mentions, env, concurrencies=opts.http_concurrency,
                                               seconds=opts.http_seconds, top_k=opts.top_k, h1=b1.h1,
                                               expected_top1=top1_b1, paired=paired, workers=workers)
            rows += http
            if share is not None:
                if http_share is None or workers == default_workers:  # the default server's share leads
                    http_share = share
                http_shares.append(share)

    if teacher_n:
        t = _teacher(linker, data_dir, mentions[:teacher_n], max(1, opts.teacher_exhaustive_n))
        if t is None:
            skipped.append("teacher row: no teacher weights")
        else:
            rows.append(t)

    if not opts.skip_ot:
        from service.offline.bench_ot import capture_problems, ot_rows

        captured: list = []
        with capture_problems(captured):  # one text batch: text-unit and (entity images) visual-unit problems
            full.link_batch([LinkQuery(m.mention, m.context, None, top_k=opts.top_k) for m in mentions[: opts.batch]])
        try:
            rows += ot_rows(captured, mentions=min(opts.batch, len(mentions)))
        except ImportError as exc:
            skipped.append(f"OT rows: {exc}")

    idx = linker.index
    return report(rows, n_mentions=len(mentions), image_mentions=len(with_image), teacher_mentions=teacher_n,
                  dataset="wikimel test", machine=machine_info(linker.runtime.providers),
                  index={"version": idx.version, "entities": len(idx), "faiss": idx.manifest.faiss_factory,
                         "features": "student" if idx.heads else "zero-shot",
                         # what this CPU measured at load (kg_index/exact.py), and the halves' threshold
                         "search_plan": dataclasses.asdict(idx.exact.plan) if idx.exact is not None else None,
                         "split_min": linker.settings.batching.split_min},
                  rerank={"candidates": linker.settings.rerank.candidates, "eps": linker.rerank.eps,
                          "skip_margin": linker.skip_margin},
                  notes=[("ratios: mentions/s and CPU-s/mention as row / baseline; h1_points as row - baseline in "
                         "H@1 points (against the teacher: on its subset, h1_subset)"),
                         "latency: per call (a call of batch B answers B mentions); HTTP: per request under wrk",
                         "CPU: the bench process's (all threads); HTTP rows: the server's (with its workers)",
                         ("http_share: the HTTP rate at the highest concurrency over the in-process batched rate, "
                          "the two measured in alternating rounds (median of the rounds' shares), for the server "
                          "`el serve` runs here by default (default_workers processes; EL_WORKERS=auto) where it was "
                          "measured; http_shares: one per server size (--http-workers)")],
                  skipped=skipped, http_share=http_share, http_shares=http_shares, default_workers=default_workers)
