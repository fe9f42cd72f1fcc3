"""Property-based API testing against the live OpenAPI document (reliability C4), with every check.

The schemathesis CLI generates requests for every operation the running server describes (the jobs and
admin routes included): the documented examples, boundary cases (coverage phase), up to 100 fuzzed cases
per operation, schema-valid and deliberately invalid, and stateful sequences along the links it infers
(create a job, read it, cancel it, delete it, read it again). `--checks all`: no server error; documented
status codes, content types, headers and response schemas; schema-valid requests accepted and schema-invalid
ones rejected; a 405 with an `Allow` header that lists the documented methods; a deleted job gone. The seed
is fixed so that CI sees the same cases on every run; the run takes about 30 s here (1,557 cases).

What is configured rather than left at schemathesis's defaults, and why:
- the server runs with small caps (SMALL_CAPS): the coverage phase sends lists of maxItems items and strings
  of maxLength characters, and every job it creates is linked by the worker; the document follows the
  settings, so the caps are tested all the same;
- 413 counts as a rejection of schema-invalid data (an image over its byte cap answers 413, not 422);
- POST /v1/admin/reload may answer 422 to a schema-valid request: whether a folder on the server holds a
  valid index is not something a request's shape can say (every other check runs on it);
- tests/hardening/schemathesis_hooks.py generates real images and JSONL job files for the media types the
  document declares, and fills in what JSON Schema cannot say (see its docstring).

(The CLI rather than the pytest plugin: the plugin's lazy fixture loader does not work with pytest 9.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hardening.server import ROOT, Server, running

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

# 413 is a rejection too (an image or body over its cap): schema-invalid data may get it.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# Reload takes a folder on the server: whether one holds a valid index is the server's disk, not the request's
# shape, so a schema-valid generated path is refused (422 invalid_index). Every other check still runs on it.
[[operations]]
include-path = "/v1/admin/reload"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]

# An entity's image part must decode (415/422 otherwise): JSON Schema cannot say it, and the fuzzing phase sends
# random bytes as image/jpeg there (the hooks make real images only for the JSON cases).
[[operations]]
include-path = "/v1/entities/{entity_id}"
include-method = "PUT"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "415", "422", "429", "5xx"]
# Schemathesis 4.32's stateful phase reports a schema-valid multipart PUT reached through a link as "schema-violating
# request accepted" ("Invalid component: positive test case"); its examples, coverage and fuzzing phases run.
phases.stateful.enabled = false
"""


# Small caps keep boundary cases cheap (the coverage phase sends lists of maxItems items and strings of
# maxLength characters); the document follows the server's settings, so they are tested all the same.
SMALL_CAPS = {"EL_LIMITS__MAX_BATCH_ITEMS": "4", "EL_JOBS__MAX_ITEMS": "4", "EL_LIMITS__MAX_IMAGE_BYTES": "4096",
              "EL_LIMITS__MAX_TEXT_CHARS": "300"}


@pytest.fixture(scope="module")
def api_server(settings, small_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    # Entity changes on: over a copy of the index of its own (the generated puts and deletes change it).
    index = tmp_path_factory.mktemp("schemathesis") / "index"
    shutil.copytree(small_index, index)
    # A generous queue: generated requests should reach validation, not bounce off the admission caps.
    with running(settings, EL_ADMISSION__MAX_QUEUE=256, EL_LOG_LEVEL="WARNING", EL_INDEX__DIR=str(index),
                 EL_UPDATES__ENABLED="true", EL_UPDATES__MAX_BATCH_ITEMS="4", **SMALL_CAPS) as s:
        yield s


def test_schemathesis_finds_no_failure(api_server: Server, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
           f"{api_server.base_url}/openapi.json", "--checks", "all",
           "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "100", "--seed", "1",
           "--request-timeout", "30", "--max-failures", "50", "--no-color", "--report", "junit",
           "--report-dir", str(tmp_path)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.hardening.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    summary = [line for line in out.splitlines() if " generated, " in line]
    m = re.search(r"(\d+) generated, (\d+) passed$", summary[-1].strip()) if summary else None
    assert m and m.group(1) == m.group(2), out[-3000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in out, (phase, out[-3000:])
    selected = re.search(r"Operations:\s+(\d+) selected / (\d+) total", out)
    assert selected and selected.group(1) == selected.group(2), out[-3000:]
