"""The GPU check, prepared for a session that is lent a GPU machine (issue 16, item 6): one short run there.

The device machine has torch with CUDA and numpy, but no fastapi, pydantic, FAISS, onnxruntime-gpu or our 384 MB
index, and a call carries at most 64 MiB. So the check takes, from here, what the GPU parts of the service compute
on: the Sinkhorn problems of one served batch (64 WikiMEL test mentions against their candidates, as
scripts/bench_sinkhorn.py builds them) and the retrieval vectors with FAISS's exact top-32 for 2,000 mention
vectors; and it times there, against that machine's own CPU in the same run, the two stages the service moves to
the GPU: our Sinkhorn (models/sinkhorn.py, the torch path every GPU solve takes) and exact search as a matrix
product with top-k (what faiss-gpu's Flat index does).

Here (needs the index and encoders, as `make bench`):
    python scripts/gpu_check.py export --dir gpu_check        # ~40 MB: problems.pt, retrieval.pt
There, in one device call (only models/sinkhorn.py of the repo is imported; gpu_check/ is git-ignored, so it
travels as `carry`, with the tracked files within the call's 64 MiB):
    run(command="python3 scripts/gpu_check.py run --dir gpu_check --out $OUT/gpu-check.json", carry=["gpu_check"])
The report: per stage, ms on CUDA and on the CPU, their ratio, and agreement (marginal error of the plans, the
largest plan difference between devices; recall@32 against FAISS's exact top-32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def export(folder: Path, mentions: int, queries: int, k: int) -> None:
    """Write problems.pt (one served batch's Sinkhorn problems) and retrieval.pt (vectors, queries, FAISS top-k)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_sinkhorn import reranker_problems

    from kg_index.readers import read_mentions
    from service.pipeline.linker import Linker
    from service.settings import Settings

    folder.mkdir(parents=True, exist_ok=True)
    cost, a, b, eps = reranker_problems(mentions)
    torch.save({"cost": cost.contiguous(), "a": a, "b": b, "eps": eps, "mentions": mentions}, folder / "problems.pt")
    settings = Settings()
    linker = Linker.from_settings(settings)
    index = linker.index
    vectors = index.faiss_index.reconstruct_n(0, index.faiss_index.ntotal)
    ms = read_mentions(settings.data_dir, "wikimel", "test")[:queries]
    feats = linker._snapshot.featurizer([m.mention for m in ms], [m.context for m in ms], [None] * len(ms))
    q = np.ascontiguousarray(feats.global_, dtype=np.float32)
    _, top = index.faiss_index.search(q, k)  # FAISS itself: exact, whatever search plan the service uses
    torch.save({"vectors": torch.from_numpy(vectors).half(), "queries": torch.from_numpy(q),
                "faiss_top": torch.from_numpy(top.astype(np.int64)), "k": k}, folder / "retrieval.pt")
    print(json.dumps({"dir": str(folder), "problems": list(cost.shape), "vectors": list(vectors.shape),
                      "queries": len(q), "mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)}))


def _time(fn, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` runs after one warm-up, in ms (CUDA synchronised around each)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) * 1000)
    return best


def check_sinkhorn(folder: Path, devices: list[torch.device], repeats: int) -> dict:
    from models.sinkhorn import OTProblem, solve

    p = torch.load(folder / "problems.pt")
    out: dict = {"problems": list(p["cost"].shape), "eps": p["eps"], "mentions": p["mentions"], "devices": {}}
    plans = {}
    for dev in devices:
        prob = OTProblem(p["cost"].to(dev), p["a"].to(dev), p["b"].to(dev), p["eps"])
        # As served: at most 15 iterations to marginal error 1e-4, the kernel domain where fp32 is safe; torch
        # (batched) is the path every GPU solve takes, and the CPU baseline here takes it too.
        res = solve(prob, max_iter=15, tol=1e-4, chunk_size=None, backend="torch")
        ms = _time(lambda prob=prob: solve(prob, max_iter=15, tol=1e-4, chunk_size=None, backend="torch"), dev, repeats)
        plans[dev.type] = res.plan.float().cpu()
        out["devices"][dev.type] = {"ms": round(ms, 3), "iterations": res.iterations,
                                    "max_marginal_error": float(res.marginal_error.max())}
    if len(plans) == 2:
        out["max_plan_difference"] = float((plans["cuda"] - plans["cpu"]).abs().max())
        out["cpu_over_cuda"] = round(out["devices"]["cpu"]["ms"] / out["devices"]["cuda"]["ms"], 2)
    return out


def check_retrieval(folder: Path, devices: list[torch.device], repeats: int, batch: int) -> dict:
    r = torch.load(folder / "retrieval.pt")
    k, faiss_top = r["k"], r["faiss_top"]
    out: dict = {"vectors": list(r["vectors"].shape), "queries": len(r["queries"]), "k": k, "batch": batch, "rows": {}}
    for dev in devices:
        for dtype in ([torch.float32, torch.float16] if dev.type == "cuda" else [torch.float32]):
            vec = r["vectors"].to(dev, dtype)
            q = r["queries"].to(dev, dtype)

            def search(vec=vec, q=q) -> torch.Tensor:
                return torch.cat([torch.topk(q[s : s + batch] @ vec.T, k, dim=1).indices
                                  for s in range(0, len(q), batch)])

            top = search().cpu()
            ms = _time(search, dev, repeats)
            recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top, faiss_top)]))
            out["rows"][f"{dev.type}_{str(dtype).split('.')[-1]}"] = {
                "ms_per_query": round(ms / len(q), 4), "recall_at_k_vs_faiss": round(recall, 4)}
    if "cuda_float32" in out["rows"]:
        cpu = out["rows"]["cpu_float32"]["ms_per_query"]
        out["cpu_over_cuda"] = {name: round(cpu / row["ms_per_query"], 1) for name, row in out["rows"].items()}
    return out


def run(folder: Path, out_path: Path | None, repeats: int, batch: int) -> dict:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    report = {"torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpu_threads": torch.get_num_threads(),
              "sinkhorn": check_sinkhorn(folder, devices, repeats),
              "retrieval": check_retrieval(folder, devices, repeats, batch)}
    text = json.dumps(report, indent=2)
    print(text)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="here: write the problems and vectors the GPU run needs")
    e.add_argument("--dir", type=Path, default=Path("gpu_check"))
    e.add_argument("--mentions", type=int, default=64, help="one served batch's mentions (x candidates = problems)")
    e.add_argument("--queries", type=int, default=2000)
    e.add_argument("--k", type=int, default=32)
    r = sub.add_parser("run", help="there (or here, CPU only): time and check both stages")
    r.add_argument("--dir", type=Path, default=Path("gpu_check"))
    r.add_argument("--out", type=Path, default=None)
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--batch", type=int, default=64, help="queries per search call")
    args = p.parse_args()
    if args.cmd == "export":
        export(args.dir, args.mentions, args.queries, args.k)
    else:
        run(args.dir, args.out, args.repeats, args.batch)


if __name__ == "__main__":
    main()
