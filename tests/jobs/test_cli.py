"""`el link-file` against the real server: results in input order; an interrupted run resumes the same job."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.jobs.db import JobDB
from tests.jobs.helpers import db_rows, many
from tests.service.conftest import Server

pytestmark = [pytest.mark.slow, pytest.mark.onnx]  # real servers over the real encoders (tests/jobs/conftest.py)


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def cli(src: Path, out: Path, server: Server) -> list[str]:
    return [sys.executable, "-m", "service", "link-file", str(src), "--out", str(out), "--url", server.base_url,
            "--poll", "0.1"]


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EL_")} | {"PYTHONUNBUFFERED": "1"}


def test_link_file_writes_one_line_per_item_in_input_order(jobs_server: Server, tmp_path: Path,
                                                            job_items: list[dict]) -> None:
    items = job_items[:20]
    out = tmp_path / "out" / "results.jsonl"
    r = subprocess.run(cli(write_jsonl(tmp_path / "in.jsonl", items), out, jobs_server), check=False, cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"job \w+ succeeded: 20/20 items, 0 failed", r.stderr), r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [i["id"] for i in items]
    assert all(line["result"]["entities"] for line in lines)


def test_link_file_delete_removes_the_job_once_its_results_are_written(jobs_server: Server, jobs_db: JobDB,
                                                                       tmp_path: Path, job_items: list[dict]) -> None:
    items = many(job_items, 6, "cli-delete")
    out = tmp_path / "results.jsonl"
    r = subprocess.run([*cli(write_jsonl(tmp_path / "in.jsonl", items), out, jobs_server), "--delete"], check=False,
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"job (\w+) succeeded: 6/6 items, 0 failed; wrote 6 lines to .*; deleted the job on the server", r.stderr)
    assert m, r.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [i["id"] for i in items]
    assert db_rows(jobs_db, "SELECT count(*) FROM jobs WHERE id = ?", m.group(1)) == [(0,)]
    assert db_rows(jobs_db, "SELECT count(*) FROM results WHERE job_id = ?", m.group(1)) == [(0,)]


def test_an_interrupted_run_resumes_the_same_job(jobs_server: Server, jobs_db: JobDB, tmp_path: Path,
                                                 job_items: list[dict]) -> None:
    items = many(job_items, 480, "cli")  # >= 4.8 s of work (120 chunks x 40 ms): Ctrl-C lands mid-job even on a loaded machine
    src = write_jsonl(tmp_path / "big.jsonl", items)
    out = tmp_path / "big-results.jsonl"
    # A shell starts background jobs with SIGINT ignored, and children inherit that; restore the default so the
    # CLI gets its KeyboardInterrupt however the test suite itself was launched.
    proc = subprocess.Popen(cli(src, out, jobs_server), cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - one syscall, no locks
    try:
        first = proc.stderr.readline()
        m = re.match(r"job (\w+) submitted", first)
        assert m, first
        proc.send_signal(signal.SIGINT)  # Ctrl-C while it polls
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "run the same command again to resume" in err, err
    assert not out.exists()
    job_id = m.group(1)
    assert f"curl -X POST {jobs_server.base_url}/v1/jobs/{job_id}/cancel" in err, err

    r = subprocess.run(cli(src, out, jobs_server), check=False, cwd=ROOT, env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"job {job_id} found (resuming)" in r.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [i["id"] for i in items]
    key = "link-file-sha256-" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert db_rows(jobs_db, "SELECT id, attempts FROM jobs WHERE idempotency_key = ?", key) == [(job_id, 1)]
