"""A throw-away PostgreSQL server for the tests: Debian's package (`apt-get install postgresql`),
started once per session with `initdb` + `postgres` in a temporary directory, listening on
127.0.0.1 only at a free port, stopped and removed at the end.

- `postgres` (session fixture): the running server, or a skip saying how to install it when the
  binaries are absent or the server does not start. With TRUSTREC_REQUIRE_POSTGRES=1 (what
  .ci/run sets once the package is installed) the same case fails instead: CI cannot go green
  by skipping every PostgreSQL test.
- `pg_url` (function fixture): a fresh database on it, dropped after the test, as a
  `postgresql+psycopg://` URL.
- TRUSTREC_PG_BIN: the directory of initdb / postgres / pg_isready, where they are not Debian's; TRUSTREC_PG_LOG:
  a file to copy the server's log to at the end (statements that failed, with their errors).

PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user the
package creates. The URL carries no password: the password is in a 0600 passfile that the URL
names (`?passfile=`), as an operator's URL should (a URL's password would reach MLflow params).
The cluster is for tests only, so durability is off (fsync, synchronous_commit, full_page_writes).
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

INSTALL = "apt-get install postgresql (Debian/Ubuntu; initdb and postgres under /usr/lib/postgresql/*/bin)"
USER = "trustrec"


def server_binaries() -> Path | None:
    """The directory holding initdb and postgres: $TRUSTREC_PG_BIN, Debian's newest version, or the PATH."""
    candidates = [os.environ["TRUSTREC_PG_BIN"]] if os.environ.get("TRUSTREC_PG_BIN") else []
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates += [str(p) for p in reversed(versions)]
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for c in candidates:
        if all((Path(c) / exe).is_file() for exe in ("initdb", "postgres", "pg_isready")):
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster in a private temporary directory; `database()` makes a fresh database on it."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="trustrec-pg-"))  # 0700
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.passfile = self.root / "pgpass"  # read by this process (libpq), never by the server
        self.run_as = None
        if os.geteuid() == 0:  # initdb and postgres refuse root
            try:
                self.run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no `postgres` user to run the server as") from None
        self._n = 0
        self._admin = None
        self.proc: subprocess.Popen | None = None

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        user = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []} if self.run_as else {}
        return subprocess.run([str(self.bindir / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, env={**os.environ, "LC_ALL": "C.UTF-8"}, **user)

    def start(self) -> None:
        pwfile = self.root / "initdb-password"
        pwfile.write_text(self.password + "\n")
        if self.run_as:  # the server's user needs the directory (and, once, the password file)
            os.chown(self.root, self.run_as.pw_uid, self.run_as.pw_gid)
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        base = ["initdb", "-D", str(self.data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"]
        # ICU en-US as the default collation where the build has ICU (Debian's has): ids must still sort bytewise
        out = self._run(*base, "--locale-provider=icu", "--icu-locale=en-US", "--locale=C.UTF-8")
        if out.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            out = self._run(*base, "--locale=C.UTF-8")
        pwfile.unlink()
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {(out.stdout + out.stderr)[-2000:]}")
        options = ["-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}", "-c", "unix_socket_directories=",
                   "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"]
        # the postmaster is this process's child, not a daemon (pg_ctl's way): with setpriv (util-linux)
        # it gets SIGQUIT (immediate shutdown) if the test process dies without tearing down
        setpriv = ["setpriv", "--pdeathsig", "QUIT", "--"] if shutil.which("setpriv") else []
        user = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []} if self.run_as else {}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*setpriv, str(self.bindir / "postgres"), "-D", str(self.data), *options], cwd=self.root,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **user)
        deadline = time.monotonic() + 60
        while self._run("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), timeout=30).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{USER}:{self.password}\n")
        self.passfile.chmod(0o600)

    def url(self, database: str = "postgres", driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://{USER}@127.0.0.1:{self.port}/{database}?passfile={self.passfile}"

    def admin(self):
        """An autocommit SQLAlchemy engine on the maintenance database (CREATE / DROP DATABASE)."""
        if self._admin is None:
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

            self._admin = create_engine(self.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        return self._admin

    def database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its name."""
        self._n += 1
        name = f"{prefix}_{os.getpid()}_{self._n}"
        with self.admin().connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')  # our own name, never input
        return name

    def drop(self, name: str) -> None:
        with self.admin().connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: ends what a test left open

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.dispose()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: a throw-away cluster
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if os.environ.get("TRUSTREC_PG_LOG") and self.log.exists():  # the server's log, kept for debugging
            shutil.copyfile(self.log, os.environ["TRUSTREC_PG_LOG"])
        shutil.rmtree(self.root, ignore_errors=True)


def _unavailable(message: str) -> None:
    if os.environ.get("TRUSTREC_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{message} (TRUSTREC_REQUIRE_POSTGRES=1: .ci/run installed PostgreSQL, so these tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server (skipped, saying how to install it, where it cannot run)."""
    bindir = server_binaries()
    if bindir is None:
        _unavailable(f"PostgreSQL server binaries (initdb, postgres) not found: {INSTALL}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is missing: `make setup` installs it (requirements/cpu.txt)")
    try:
        server = PostgresServer(bindir)
    except RuntimeError as e:
        _unavailable(f"PostgreSQL cannot start here: {e}")
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        server.stop()
        _unavailable(f"PostgreSQL from {bindir} did not start: {e}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres):
    """A fresh database for one test, as a postgresql+psycopg:// URL; dropped afterwards."""
    name = postgres.database()
    yield postgres.url(name)
    postgres.drop(name)


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def backend_url(request, tmp_path: Path, name: str = "features.db") -> str:
    """The store URL of a test parametrized over BACKENDS: a SQLite file in tmp_path, or a fresh
    PostgreSQL database (through the `pg_url` fixture)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / name}"
    return request.getfixturevalue("pg_url")
