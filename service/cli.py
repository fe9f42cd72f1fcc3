"""The `el` command: serve, worker, build-index, compact-index, eval, bench, bench-scale, bench-updates, train,
tune-weights, fit-skip-margin, fit-calibration, link-file.

Settings come from EL_ variables (see README); the offline commands run service/offline/."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from service.logging_setup import configure_logging
from service.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "models/weights/calibration.json"


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    if args.ray:
        from service.scale.serve import run_serve  # Ray only when asked for (the `scale` extra)

        return run_serve(settings, replicas=args.replicas)
    from service.server import serve

    if args.workers is not None:
        settings = settings.model_copy(update={"workers": max(1, args.workers)})
    # uvicorn with a readiness drain on SIGTERM and an index reload on SIGHUP (service/server.py), in EL_WORKERS
    # processes (service/prefork.py).
    return serve(settings, _create_app)


def _create_app(settings: Settings, **kwargs):  # -> FastAPI, not imported here
    """service.app.create_app, imported when called: a worker process of `el serve --workers N` gets this by
    reference and imports the app itself, so their supervisor never loads torch, FAISS or ONNX Runtime (about 170 MB
    of its memory, measured)."""
    from service.app import create_app

    return create_app(settings, **kwargs)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    if args.ray:
        from service.scale.workers import run_ray_workers  # Ray only when asked for (the `scale` extra)

        return run_ray_workers(settings, workers=args.workers)
    from service.jobs.worker import run_worker

    return run_worker(settings, metrics_port=args.metrics_port)


def _build_index(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.indexing import build_configured_index

    if args.if_missing:
        reason = _why_rebuild(settings)
        if reason is None:
            return 0
        logger.info("%s; building the index", reason)
    m = build_configured_index(settings)
    print(json.dumps({"version": m.version, "dir": str(settings.index.dir), "entities": m.n_entities,
                      "images": m.n_images, "faiss": m.faiss_factory}))
    return 0


def _compact_index(settings: Settings, args: argparse.Namespace) -> int:
    """Through a running server (--url: POST /v1/admin/compact), else here on EL_INDEX__DIR: servers on the folder
    go on serving and changing it, and load the compacted folder when they see it swapped in."""
    if args.url:
        import httpx

        headers = {"Authorization": f"Bearer {os.environ['EL_API_KEY']}"} if os.environ.get("EL_API_KEY") else {}
        r = httpx.post(f"{args.url.rstrip('/')}/v1/admin/compact", params={"wait": str(not args.no_wait).lower()},
                       headers=headers, timeout=None)
        print(r.text)
        return 0 if r.status_code == 200 else 1
    from kg_index.changelog import LogBusy
    from kg_index.live_store import LiveStore
    from service.encoders import export_encoders
    from service.pipeline.linker import load_checked_index

    runtime = export_encoders(settings)
    index, _ = load_checked_index(settings, runtime, settings.index.dir)
    store = LiveStore(index, encoder_signature=runtime.spec.signature())
    try:
        before, changes = store.snapshot.version, store.pending
        if not changes and not args.force:
            print(json.dumps({"index_version": before, "changes": 0, "compacted": False}))
            return 0
        snap = store.compact()
    except LogBusy as exc:
        print(f"el compact-index: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps({"previous_version": before, "index_version": snap.version, "changes": changes,
                      "entities": len(snap), "compacted": True}))
    return 0


def _bench_updates(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.bench_updates import Options, run

    report = run(settings, Options(requests=args.requests, clients=args.clients, batch=args.batch, rounds=args.rounds,
                                   update_clients=args.update_clients, workers=args.workers, out=Path(args.out)))
    keys = ("update_encoder", "text_entities_per_s", "image_entities_per_s", "text_entities_per_s_alone", "image_entities_per_s_alone",
            "text_entities_per_server_cpu_s", "image_entities_per_server_cpu_s", "p99_ratio_text_updates_to_idle",
            "p99_ratio_image_updates_to_idle", "idle", "during_text_updates", "during_image_updates", "cpus",
            "idle_cores", "cores_for_goal_rates")
    print(json.dumps({k: report[k] for k in keys}))
    return 0


def _why_rebuild(settings: Settings) -> str | None:
    """Why the index at EL_INDEX__DIR cannot be kept (one line for the log), or None to keep it (logged)."""
    from kg_index.manifest import MANIFEST, IndexIntegrityError, Manifest
    from service.encoders import export_encoders
    from service.index_source import check_index_source

    folder = settings.index.dir
    if not (folder / MANIFEST).is_file():
        return f"no index at {folder}"
    try:
        m = Manifest.read(folder)
    except IndexIntegrityError as exc:
        return str(exc)
    signature = export_encoders(settings).spec.signature()
    if m.encoder_signature != signature:
        return f"index {m.version} at {folder} was built with encoders {m.encoder_signature}, not {signature}"
    check = check_index_source(settings, m)
    if check.status == "unknown":
        return f"index {m.version} at {folder}: {check.message}"
    if check.status == "mismatch":
        if not settings.index.allow_source_mismatch:
            return f"index {m.version} at {folder} ({m.n_entities} entities) was {check.message}"
        logger.warning("index %s at %s was %s; kept because EL_INDEX__ALLOW_SOURCE_MISMATCH is set", m.version,
                       folder, check.message)
        return None
    logger.info("index %s already at %s, built from the configured KG (%d entities); skipping the build",
                m.version, folder, m.n_entities)
    return None


def _eval(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.evaluation import evaluate, format_table, write_report
    from service.pipeline.linker import Linker

    linker = Linker.from_settings(settings)
    report = evaluate(linker, settings.data_dir, args.dataset, args.split, limit=args.limit, teacher=not args.no_teacher,
                      skip_margin=args.skip_margin)
    path, plot = write_report(report, Path(args.out))
    print(format_table(report))
    print(f"wrote {path} and {plot}")
    return 0


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.bench import format_rows, write_bench
    from service.offline.bench_run import BenchOptions, run_bench
    from service.pipeline.linker import Linker

    linker = Linker.from_settings(settings)
    linker.warm_up()
    opts = BenchOptions(n=args.n, image_n=args.image_n, batch=args.batch, teacher_n=args.teacher_n,
                        teacher_exhaustive_n=args.teacher_exhaustive_n, single_n=args.single_n,
                        http_seconds=args.http_seconds, http_concurrency=tuple(args.concurrency),
                        http_workers=tuple(max(1, w) for w in args.http_workers),
                        paired_rounds=args.paired_rounds, paired_seconds=args.paired_seconds,
                        skip_plain=args.skip_plain, skip_http=args.skip_http, skip_teacher=args.skip_teacher,
                        skip_ot=args.skip_ot, skip_precision=args.skip_precision, cache_dir=Path(args.cache_dir))
    report = run_bench(linker, settings.data_dir, opts)
    out = Path(args.out)
    chart = write_bench(report, out)
    print(format_rows(report))
    print(f"wrote {out} and {chart}")
    return 0


def _fit_skip_margin(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.skip_margin import fit, split_margins
    from service.pipeline.linker import Linker

    linker = Linker.from_settings(settings)
    splits = [split_margins(linker, settings.data_dir, ds, args.split, limit=args.limit) for ds in args.datasets]
    result = fit(splits, max_loss=args.max_loss_points / 100)
    for row in result["table"]:
        print(json.dumps(row))
    print(json.dumps({"at_fit": result["at_fit"]}))
    print(f"EL_RERANK__SKIP_MARGIN={result['skip_margin']}")
    return 0


def _fit_calibration(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.calibration import run_fit
    from service.pipeline.linker import Linker
    from service.pipeline.mention_prior import prior_path

    cal, prior = run_fit(Linker.from_settings(settings), settings.data_dir, args.datasets, args.split,
                         limit=args.limit, files=[Path(f) for f in args.mentions])
    out = Path(args.out)
    cal.save(out)
    prior.save(prior_path(out))
    print(json.dumps(cal.report, indent=1))
    print(f"nil threshold on P(answerable): {cal.nil_threshold}")
    print(f"wrote {out}" + ("" if args.out == DEFAULT_CALIBRATION else f"; serve it with EL_CALIBRATION__PATH={out}"))
    return 0


def _bench_scale(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.bench_scale import FactoryGrid, format_table, run_bench_scale, write_report
    from service.pipeline.linker import Linker

    linker = Linker.from_settings(settings)
    linker.warm_up()
    grid = [FactoryGrid.parse(f) for f in args.factory] if args.factory else None
    report = run_bench_scale(linker, settings.data_dir, entities=args.entities, cache=Path(args.cache), grid=grid,
                             queries=args.queries, single=args.single, batch=args.batch, link_n=args.link_n,
                             seed=args.seed, link=not args.no_link, http=not args.no_http)
    out = Path(args.out)
    write_report(report, out)
    print(format_table(report))
    print(json.dumps(report["goals"], indent=2))
    print(f"wrote {out}")
    return 0


def _tune_weights(settings: Settings, args: argparse.Namespace) -> int:
    from service.offline.tuning import tune
    from service.pipeline.linker import Linker

    result = tune(Linker.from_settings(settings), args.datasets, args.split, limit=args.limit, ot_weight=args.ot_weight)
    for ds, recall in result["recall"].items():
        print(f"{ds}: recall@{result['candidates']} of the retrieval {recall:.4f}")
    for row in result["rows"]:
        print(json.dumps(row))
    print(result["settings"])
    return 0


def _link_file(settings: Settings, args: argparse.Namespace) -> int:
    """Submit a JSONL file as a job, show progress, write the results; rerunning resumes the same job."""
    import os

    from tqdm import tqdm

    from service.jobs.client import JobClient, JobClientError, file_key

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll would break the progress bar
    src, out = Path(args.input), Path(args.out)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = args.url or os.environ.get("EL_URL") or f"http://{host}:{settings.port}"
    key = args.key or file_key(src)
    client = JobClient(url, api_key=os.environ.get("EL_API_KEY"), give_up_after_s=args.give_up_after)
    job_id = None
    try:
        job_id, created = client.submit_file(src, key)
        print(f"job {job_id} {'submitted' if created else 'found (resuming)'}; Idempotency-Key {key}",
              file=sys.stderr, flush=True)
        with tqdm(unit="item", desc=f"job {job_id[:8]}", disable=args.quiet, file=sys.stderr) as bar:
            def show(job: dict) -> None:
                progress = job["progress"]
                bar.total = progress["total"]
                bar.n = progress["done"]
                bar.set_postfix(state=job["state"], failed=progress["failed"], refresh=False)
                bar.refresh()

            job = client.wait(job_id, poll_s=args.poll, on_progress=show)
        lines = client.download(job_id, out)
        if args.delete:  # the results are safe on disk: free the server's copy now instead of at expiry
            client.delete(job_id)
    except JobClientError as exc:
        print(f"el link-file: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = (f"; to stop it: curl -X POST {url.rstrip('/')}/v1/jobs/{job_id}/cancel (keeps its results) or "
               f"curl -X DELETE {url.rstrip('/')}/v1/jobs/{job_id} (deletes it)") if job_id else ""
        print(f"\ninterrupted; job {job_id or '(not yet submitted)'} keeps running on the server; run the same "
              f"command again to resume{how}", file=sys.stderr)
        return 130
    finally:
        client.close()
    p = job["progress"]
    print(f"job {job_id} {job['state']}: {p['done']}/{p['total']} items, {p['failed']} failed; "
          f"wrote {lines} lines to {out}{'; deleted the job on the server' if args.delete else ''}", file=sys.stderr)
    return 0 if job["state"] == "succeeded" else 1


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from models.export import ensure_exported
    from models.runtime import EncoderRuntime
    from models.train import TrainConfig
    from service.offline.training import run

    enc = settings.encoder
    ensure_exported(enc.onnx_dir, text=enc.text_backbone, image=enc.image_backbone, clip_path=enc.clip_path,
                    max_tokens=enc.max_tokens, image_size=enc.image_size)
    runtime = EncoderRuntime(enc.onnx_dir, device=enc.device, threads=enc.intra_op_threads)
    cfg = TrainConfig(data_dir=settings.data_dir, onnx_dir=enc.onnx_dir, cache_dir=settings.features_dir,
                      weights_dir=Path(args.weights_dir),
                      reports_dir=Path(args.reports), limit=args.limit, dev_limit=args.dev_limit,
                      batch_size=args.batch_size, student_only=args.student_only,
                      retrieval_loss_weight=args.retrieval_loss_weight, dropout=args.dropout,
                      weight_decay=args.weight_decay,
                      **{k: v for k in ("teacher_epochs", "student_epochs", "student_mention_layers",
                                        "student_tuned_layers", "tuned_lr") if (v := getattr(args, k)) is not None})
    summary = run(cfg, runtime)
    print(json.dumps({"total_s": summary["total_s"], "teacher_dev_mrr": summary["teacher"]["best_mrr"],
                      "student_dev_mrr": summary["student"]["best_mrr"], "weights": args.weights_dir}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="el", description="Multimodal entity linking (OT-MEL) service tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sv = sub.add_parser("serve", help="serve the HTTP API on EL_HOST:EL_PORT")
    sv.add_argument("--ray", action="store_true", help="as Ray Serve replicas behind one address (joins "
                    "EL_RAY__ADDRESS, else starts a local Ray head); README: Scaling out")
    sv.add_argument("--replicas", type=int, default=None, help="replicas with --ray (default EL_RAY__REPLICAS)")
    sv.add_argument("--workers", type=int, default=None, help="server processes on the one port (default "
                    "EL_WORKERS; more than 1 refuses entity changes: README, Worker processes)")
    sv.set_defaults(fn=_serve)
    wk = sub.add_parser("worker", help="run batch jobs from the shared job store (EL_JOBS__DATABASE_URL) without an "
                        "HTTP server; start several to share one queue")
    wk.add_argument("--ray", action="store_true", help="run --workers workers as Ray actors (restarted by Ray when "
                    "they die) on the cluster at EL_RAY__ADDRESS, or a local one")
    wk.add_argument("--workers", type=int, default=1, help="Ray actors to run (with --ray)")
    wk.add_argument("--metrics-port", type=int, default=None, help="serve this worker's Prometheus metrics on "
                    "EL_HOST:PORT/metrics")
    wk.set_defaults(fn=_worker)
    b = sub.add_parser("build-index", help="export the encoders and build the index at EL_INDEX__DIR")
    b.add_argument("--if-missing", action="store_true", help="keep the index already there when it was built with "
                   "the configured encoders from the configured KG (same file contents); else rebuild")
    b.set_defaults(fn=_build_index)
    ci = sub.add_parser("compact-index", help="fold the entity change log into a fresh index folder and swap it in")
    ci.add_argument("--url", default=None, help="a running server to compact (POST /v1/admin/compact; key from "
                    "$EL_API_KEY); default: offline, on EL_INDEX__DIR")
    ci.add_argument("--no-wait", action="store_true", help="with --url: return once the compaction has started")
    ci.add_argument("--force", action="store_true", help="offline: rewrite the folder even with an empty log")
    ci.set_defaults(fn=_compact_index)
    e = sub.add_parser("eval", help="evaluate on a benchmark split (writes reports/eval-<dataset>-<split>.json)")
    e.add_argument("--dataset", default="wikimel", choices=["wikimel", "richpedia", "wikidiverse"])
    e.add_argument("--split", default="test", choices=["train", "dev", "test"])
    e.add_argument("--limit", type=int, default=None, help="first N mentions only")
    e.add_argument("--out", default="reports")
    e.add_argument("--no-teacher", action="store_true", help="skip the teacher's exhaustive row and the encode timings")
    e.add_argument("--skip-margin", type=float, default=None,
                   help="add the adaptive-rerank row at this margin (default: EL_RERANK__SKIP_MARGIN, else no row)")
    e.set_defaults(fn=_eval)
    p = sub.add_parser("bench", help="side by side: plain bi-encoder, served (in process, HTTP), teacher, Sinkhorn vs "
                       "POT (writes reports/bench.json and bench.png)")
    p.add_argument("--n", type=int, default=2000, help="WikiMEL test mentions for the text rows")
    p.add_argument("--image-n", type=int, default=256, help="mentions with a local image for the text + image rows")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-n", type=int, default=200, help="mentions the exhaustive teacher scores")
    p.add_argument("--teacher-exhaustive-n", type=int, default=3,
                   help="of those, mentions timed with every cross term solved (the protocol as it is; ~1.5 s each)")
    p.add_argument("--single-n", type=int, default=300,
                   help="mentions of the plain bi-encoder's single-request row (its p50 is the single-request baseline)")
    p.add_argument("--http-seconds", type=float, default=10.0, help="wrk duration per concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="wrk concurrencies")
    p.add_argument("--paired-rounds", type=int, default=3,
                   help="alternating in-process (batch --batch) / HTTP (highest concurrency) rounds for the HTTP share; 0: none")
    p.add_argument("--paired-seconds", type=float, default=8.0, help="wrk duration per paired round")
    p.add_argument("--http-workers", type=int, nargs="+", default=[1, 2],
                   help="HTTP rows (and share) for a server of each of these many processes (EL_WORKERS); 1: only "
                   "the default single-process server")
    p.add_argument("--skip-plain", action="store_true", help="no plain bi-encoder row")
    p.add_argument("--skip-http", action="store_true", help="no HTTP rows (they also skip when wrk is missing)")
    p.add_argument("--skip-teacher", action="store_true", help="no teacher row (its first run caches KB features)")
    p.add_argument("--skip-ot", action="store_true", help="no Sinkhorn-vs-POT rows")
    p.add_argument("--skip-precision", action="store_true",
                   help="no rows with the mention encoder in the other precision (fp32 where int8 is served, as on "
                   "CPU by default; int8 where fp32 is: EL_ENCODER__QUANTIZE_INT8)")
    p.add_argument("--cache-dir", default="artifacts/bench",
                   help="where the plain bi-encoder's entity matrix and the other precision's encoder export are cached")
    p.add_argument("--out", default="reports/bench.json")
    p.set_defaults(fn=_bench)
    sc = sub.add_parser("bench-scale", help="FAISS index types and /v1/link latency at N entities, real plus synthetic "
                        "(writes reports/bench-scale.json)")
    sc.add_argument("--entities", type=int, default=1_000_000, help="index size: the served KG's entities plus "
                    "synthetic ones made from them (a random subset when smaller)")
    sc.add_argument("--factory", action="append", default=None, metavar="SPEC",
                    help="a FAISS factory and its search knob values, e.g. 'HNSW32,Flat:efSearch=64/128' (repeat; "
                         "Flat is required, the exact reference); default: Flat, HNSW32 and IVF<4 sqrt(N)>,Flat")
    sc.add_argument("--queries", type=int, default=2000, help="WikiMEL test mentions to search with (recall, batches)")
    sc.add_argument("--single", type=int, default=300, help="of those, searched one at a time (Flat: at most 20)")
    sc.add_argument("--batch", type=int, default=64)
    sc.add_argument("--link-n", type=int, default=200, help="mentions linked on both indexes (Linker.link latency)")
    sc.add_argument("--no-link", action="store_true", help="search figures only")
    sc.add_argument("--no-http", action="store_true", help="time Linker.link in process only, not also POST /v1/link "
                    "through the service on loopback")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--cache", default="artifacts/scale", help="where vectors and built indexes are kept for reruns")
    sc.add_argument("--out", default="reports/bench-scale.json")
    sc.set_defaults(fn=_bench_scale)
    bu = sub.add_parser("bench-updates", help="entity changes per second while /v1/link serves, and the link p99 "
                        "against idle (writes reports/updates.json)")
    bu.add_argument("--requests", type=int, default=150, help="/v1/link requests per phase")
    bu.add_argument("--clients", type=int, default=2, help="concurrent /v1/link client threads")
    bu.add_argument("--batch", type=int, default=32, help="entities per POST /v1/entities:batch")
    bu.add_argument("--rounds", type=int, default=1, help="text-only and image phases, each between idle ones")
    bu.add_argument("--update-clients", type=int, default=None,
                    help="concurrent entity-change streams (default: one per server process)")
    bu.add_argument("--workers", type=int, default=None, help="server processes (default: what `el serve` runs "
                    "here, EL_WORKERS; auto: one per usable CPU)")
    bu.add_argument("--out", default="reports/updates.json")
    bu.set_defaults(fn=_bench_updates)
    t = sub.add_parser("train", help="train the OT-MEL teacher and the distilled student (writes models/weights/)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--limit", type=int, default=None, help="first N training mentions only (smoke runs)")
    t.add_argument("--dev-limit", type=int, default=None, help="first N dev mentions only")
    t.add_argument("--student-only", action="store_true", help="distil a new student from the saved teacher")
    t.add_argument("--retrieval-loss-weight", type=float, default=1.0)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--weight-decay", type=float, default=0.01)
    # Left unset, these take TrainConfig's defaults (models/train.py).
    t.add_argument("--teacher-epochs", type=int, default=None, help="at most this many (early stopping on dev MRR)")
    t.add_argument("--student-epochs", type=int, default=None, help="at most this many (early stopping on dev MRR)")
    t.add_argument("--student-mention-layers", type=int, default=None,
                   help="text-backbone layers of the student's mention encoder (0 = all, as the teacher)")
    t.add_argument("--student-tuned-layers", type=int, default=None, help="the top ones of those fine-tuned with the heads")
    t.add_argument("--tuned-lr", type=float, default=None, help="peak learning rate of the fine-tuned layers")
    t.add_argument("--weights-dir", default="models/weights")
    t.add_argument("--reports", default="reports")
    t.set_defaults(fn=_train)
    w = sub.add_parser("tune-weights", help="fit the rerank score weights on dev splits (prints EL_RERANK__ settings)",
                       description="Fit the rerank score weights by a listwise softmax over the reranked candidates of "
                                   "each split (each split weighing the same); retrieval stays 1.0. Prints H@1 and MRR "
                                   "with the current and the fitted weights, then the settings to use.")
    w.add_argument("datasets", nargs="*", default=["wikimel"], help="benchmarks to fit on (default: wikimel)")
    w.add_argument("--split", default="dev")
    w.add_argument("--limit", type=int, default=None, help="first N mentions of each split only")
    w.add_argument("--ot-weight", type=float, default=None,
                   help="fix the OT weight instead of fitting it (1.0 keeps retrieval + OT at OT-MEL's overall score)")
    w.set_defaults(fn=_tune_weights)
    f = sub.add_parser("fit-skip-margin", help="fit EL_RERANK__SKIP_MARGIN (adaptive rerank) on dev splits",
                       description="Link each split with OT always solved, then print, per margin, the H@1 and the "
                                   "share of OT solves skipped when mentions with a larger no-OT margin skip OT, and "
                                   "the smallest margin costing at most --max-loss-points H@1 on every split.")
    f.add_argument("datasets", nargs="*", default=["wikimel", "richpedia", "wikidiverse"])
    f.add_argument("--split", default="dev")
    f.add_argument("--limit", type=int, default=None, help="first N mentions of each split only")
    f.add_argument("--max-loss-points", type=float, default=0.1, help="H@1 points the skip may cost on any split")
    f.set_defaults(fn=_fit_skip_margin)
    fc = sub.add_parser("fit-calibration", help="fit the served confidence and NIL rule on dev splits (writes "
                        "models/weights/calibration.json)",
                        description="Link each split against the whole KB and under the NIL protocol (a fixed-seed "
                                    "20 % of its gold entities masked out of the KB), fit the confidence and answerable "
                                    "models and the NIL threshold, print in-sample and cross-fitted figures.")
    fc.add_argument("datasets", nargs="*", default=["wikimel", "richpedia", "wikidiverse"])
    fc.add_argument("--split", default="dev")
    fc.add_argument("--limit", type=int, default=None, help="first N mentions of each split only")
    fc.add_argument("--mentions", action="append", default=[], metavar="JSONL",
                    help="your own KG: a file of labelled mentions, one {\"mention\", \"context\", \"answer\"} per "
                         "line, fitted on instead of the benchmarks (repeat for several)")
    fc.add_argument("--out", default=DEFAULT_CALIBRATION, help="where to write the calibration JSON")
    fc.set_defaults(fn=_fit_calibration)
    lf = sub.add_parser("link-file", help="link a JSONL file of mentions as a server-side job (rerun to resume)")
    lf.add_argument("input", help="JSONL, one link request with an \"id\" per line")
    lf.add_argument("--out", required=True, help="where to write the results (JSONL, input order)")
    lf.add_argument("--url", default=None, help="server URL (default: $EL_URL, else http://EL_HOST:EL_PORT)")
    lf.add_argument("--key", default=None, help="Idempotency-Key (default: derived from the file's SHA-256)")
    lf.add_argument("--poll", type=float, default=1.0, help="seconds between progress polls")
    lf.add_argument("--give-up-after", type=float, default=600.0,
                    help="seconds to keep retrying while the server is unreachable or busy")
    lf.add_argument("--delete", action="store_true",
                    help="delete the job and its results on the server once the results are written")
    lf.add_argument("--quiet", action="store_true", help="no progress bar")
    lf.set_defaults(fn=_link_file)
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValueError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    from kg_index.manifest import IndexIntegrityError

    try:
        return args.fn(settings, args)
    except IndexIntegrityError as exc:  # a refused index (el eval, el bench): the message says which and why
        print(f"el {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
