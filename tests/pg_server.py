"""A real PostgreSQL server for the ledger tests, started by the test suite itself.

Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``): ``initdb`` a cluster in a temporary
folder, ``pg_ctl start`` it on a free port on 127.0.0.1 with trust authentication, one fresh database per
test, ``pg_ctl stop`` at teardown. PostgreSQL refuses to run as root, so as root the binaries run as the
``postgres`` user (``runuser``) in a folder it owns.

Where the binaries are missing the server tests skip with the reason; in CI (``CI`` or
``SSPROP_ENERGY_REQUIRE_PG`` set) a missing or broken server fails them instead, so a green CI run always
means the PostgreSQL backend was tested.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def _required() -> bool:
    return bool(os.environ.get("SSPROP_ENERGY_REQUIRE_PG") or os.environ.get("CI"))


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI."""
    if _required():
        pytest.fail(f"PostgreSQL server tests are required here (CI / SSPROP_ENERGY_REQUIRE_PG) but {reason}")
    pytest.skip(f"PostgreSQL server tests skipped: {reason} (apt-get install postgresql)")


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One throw-away PostgreSQL cluster; :meth:`stop` / :meth:`start` simulate an outage."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="ssprop-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("we run as root and there is no 'postgres' user to run the server as")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            runuser = shutil.which("runuser")
            self._as = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        self.start()

    def _run(self, prog: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / prog), *args]
        if self._as and self._as[0] == "su":
            import shlex

            argv = [*self._as, shlex.join(argv)]
        else:
            argv = [*self._as, *argv]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.base)
        if check and res.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            unavailable(f"{prog} failed ({res.returncode}): {res.stderr.strip()[-1000:]} {log}")
        return res

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"ledger_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")  # the cluster is thrown away: no shutdown checkpoint to wait for
        shutil.rmtree(self.base, ignore_errors=True)


def start_server() -> PgServer:
    bin_dir = pg_bin()
    if bin_dir is None:
        unavailable("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the psycopg package is not installed (pip install -e '.[test]')")
    return PgServer(bin_dir)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_server():
    server = start_server()
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a fresh, empty database on the session's server."""
    return pg_server.create_database()
