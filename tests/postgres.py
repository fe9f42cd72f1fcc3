"""A throwaway PostgreSQL server for tests and local benchmarks: `initdb` into a temporary folder, `pg_ctl start`
on 127.0.0.1 (and a unix socket in that folder), one fresh database per caller, everything removed on stop.

initdb refuses to run as root: as root the cluster belongs to the `postgres` user (runuser) or, where there is
none, to `nobody` (setpriv). Binaries come from PATH or Debian's /usr/lib/postgresql/<version>/bin.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Self

logger = logging.getLogger(__name__)


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def available() -> bool:
    return all(find_binary(n) for n in ("initdb", "pg_ctl", "postgres"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user() -> tuple[list[str], str | None]:
    """The command prefix that runs PostgreSQL's tools as a non-root user, and that user's name."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            continue
        if user == "postgres" and shutil.which("runuser"):
            return ["runuser", "-u", user, "--"], user
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"], user
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists for initdb")


class LocalPostgres:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or int(os.environ.get("EL_TEST_PG_PORT") or 0) or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="el-pg-"))
        self.user = "el"
        self._prefix, self._owner = _as_user()

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> LocalPostgres:
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        if not (initdb and pg_ctl):
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql "
                               "(Debian: apt-get install postgresql; .ci/run does this)")
        if self._owner:
            shutil.chown(self.dir, self._owner)
        data = self.dir / "data"
        subprocess.run([*self._prefix, initdb, "-D", str(data), "--auth=trust", "-U", self.user, "-E", "UTF8",
                        "--no-sync", "--no-instructions"], check=True, capture_output=True, text=True)
        # fsync off: a test cluster is thrown away; durability is PostgreSQL's own, tested by its authors.
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        r = subprocess.run([*self._prefix, pg_ctl, "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w",
                            "-t", "60", "start"], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stdout}{r.stderr}\n{log[-2000:]}")
        logger.info("PostgreSQL on 127.0.0.1:%d (%s)", self.port, self.dir)
        return self

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        pg_ctl = find_binary("pg_ctl")
        if pg_ctl and (self.dir / "data" / "postmaster.pid").exists():
            subprocess.run([*self._prefix, pg_ctl, "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop"],
                           capture_output=True, text=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
