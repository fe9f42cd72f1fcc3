"""Property-based API testing against the live OpenAPI document (reliability C4).

The schemathesis CLI generates requests for every operation the running server describes (the jobs routes
included when the server has them): the documented examples, boundary cases (coverage phase), up to 100
fuzzed cases per operation, schema-valid and deliberately invalid, and stateful sequences along the links
it infers (create a job, then read it). Every answer must not be a server error and must match the
documented status codes, content types and response schemas. The seed is fixed so that CI sees the same
cases on every run; the run takes about 20 s here.

(The CLI rather than the pytest plugin: the plugin's lazy fixture loader does not work with pytest 9.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.hardening.server import Server, running

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def api_server(settings) -> Server:
    # A generous queue: generated requests should reach validation, not bounce off the admission caps.
    with running(settings, EL_ADMISSION__MAX_QUEUE=256, EL_LOG_LEVEL="WARNING") as s:
        yield s


def test_schemathesis_finds_no_failure(api_server: Server, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{api_server.base_url}/openapi.json",
           "--checks", CHECKS, "--max-examples", "100", "--seed", "1", "--request-timeout", "30",
           "--max-failures", "20", "--no-color", "--report", "junit", "--report-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    summary = [line for line in out.splitlines() if " generated, " in line]
    assert summary and "passed" in summary[-1] and "fail" not in summary[-1], out[-3000:]
    assert "Operations:       " in out and "Tested:" in out
