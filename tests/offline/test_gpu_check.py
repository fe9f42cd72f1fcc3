"""scripts/gpu_check.py's `run` (the prepared GPU check) on the CPU, on a small synthetic folder: it solves the
problems to the served tolerance and finds the exact top-k its folder says FAISS found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from models.sinkhorn import uniform_marginals

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_the_cpu(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    mask_a = torch.arange(6)[None] < torch.randint(2, 7, (40, 1), generator=g)
    mask_b = torch.arange(9)[None] < torch.randint(3, 10, (40, 1), generator=g)
    # Costs like the reranker's (1 - cosine of similar token features: a narrow span), which converge in a few
    # iterations.
    torch.save({"cost": 0.9 + 0.1 * torch.rand(40, 6, 9, generator=g), "a": uniform_marginals(mask_a),
                "b": uniform_marginals(mask_b), "eps": 0.05, "mentions": 4}, tmp_path / "problems.pt")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 16)).astype(np.float16)  # stored half, as the export writes them
    queries = rng.standard_normal((70, 16)).astype(np.float32)
    top = np.argsort(-(queries @ vectors.astype(np.float32).T), axis=1)[:, :8]  # the exact answer, as FAISS gives it
    torch.save({"vectors": torch.from_numpy(vectors), "queries": torch.from_numpy(queries),
                "faiss_top": torch.from_numpy(top), "k": 8}, tmp_path / "retrieval.pt")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "run", "--dir", str(tmp_path),
                           "--out", str(out), "--repeats", "1", "--batch", "32"], check=False, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    cpu = report["sinkhorn"]["devices"]["cpu"]
    assert cpu["ms"] > 0 and 1 <= cpu["iterations"] <= 15 and cpu["max_marginal_error"] <= 1e-4
    assert report["retrieval"]["rows"]["cpu_float32"]["recall_at_k_vs_faiss"] == 1.0
