"""The docker-compose `cluster` profile wires PostgreSQL (official image), a Ray head, the API as Ray Serve
replicas with no job worker of its own, and `el worker` processes on the shared job store; the image it builds
installs the `scale` extra. Linted like the rest by tests/test_packaging.py (hadolint, compose config)."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT


def cluster_services() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {name: svc for name, svc in spec["services"].items() if "cluster" in (svc.get("profiles") or [])}


def command(svc: dict) -> str:
    cmd = svc.get("command") or []
    return cmd if isinstance(cmd, str) else " ".join(cmd)


def test_cluster_profile_has_postgres_a_ray_head_the_api_and_workers() -> None:
    svcs = cluster_services()
    assert {"postgres", "ray-head", "api", "worker"} <= set(svcs)
    assert svcs["postgres"]["image"].startswith("postgres:")
    assert "ray start --head" in command(svcs["ray-head"])
    api, worker = svcs["api"], svcs["worker"]
    assert "el serve --ray" in command(api) and "--address=ray-head:6379" in command(api)
    assert command(worker).startswith("el worker")
    for svc in (api, worker):
        env = svc["environment"]
        assert env["EL_JOBS__DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["EL_JOBS__DATABASE_URL"]
        assert env["EL_JOBS__RUN_WORKER"] == "false"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Every Ray node and worker sees the index at the same path (one named volume on this host).
    for name in ("ray-head", "api", "worker", "index"):
        assert any(str(v).startswith("el-artifacts:/var/lib/el") for v in svcs[name]["volumes"]), name
    assert "scale" in svcs["ray-head"]["build"]["args"]["EXTRAS"]


def test_the_dockerfile_takes_the_extras_as_a_build_argument() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG EXTRAS=serve" in text and 'EXTRAS="$EXTRAS"' in text
