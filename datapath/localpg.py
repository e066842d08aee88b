"""A throwaway PostgreSQL server for tests and local trials: initdb, run, remove.

PostgreSQL refuses to run as root. When this process is root (CI is), the cluster lives in
a fresh directory under the system temp dir owned by the ``postgres`` user, and initdb and
postgres run as that user. They are started with ``subprocess.Popen(user=...)`` rather than
``runuser``: runuser stays the parent and answers SIGTERM by SIGKILLing its child after two
seconds, which would turn every clean shutdown into a crash recovery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapath.localsite import die_with_parent, free_loopback_ports, log_tail

log = logging.getLogger(__name__)

PG_BIN_ENV = "DATAMOVER_PG_BIN"
RUN_AS_USER = "postgres"
SUPERUSER = "postgres"
READY_LINE = b"database system is ready to accept connections"
_PORT_PICK_ATTEMPTS = 3
# A test database: durability off, small memory.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "50",
}


class PostgresError(RuntimeError):
    """The local PostgreSQL could not be set up or started; the message says why."""


def postgres_bin_dir() -> Path:
    """``$DATAMOVER_PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin``, else PATH."""
    override = os.environ.get(PG_BIN_ENV)
    if override:
        return Path(override)
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if candidates:
        return max(candidates, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    initdb = shutil.which("initdb")
    if initdb is None:
        raise PostgresError(f"no initdb: install PostgreSQL or set {PG_BIN_ENV}")
    return Path(initdb).parent


def _run_as_kwargs() -> dict[str, Any]:
    """Popen arguments that drop root to the postgres user; none when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(RUN_AS_USER)
    except KeyError as exc:
        raise PostgresError(
            f"running as root and there is no {RUN_AS_USER!r} user to run PostgreSQL as"
        ) from exc
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


@dataclass(eq=False)
class LocalPostgres:
    """One PostgreSQL server on a loopback port, trust authentication, user ``postgres``."""

    base_dir: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _remove_base_dir: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def dsn(self) -> str:
        """libpq/asyncpg form: ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        """SQLAlchemy form: ``postgresql+asyncpg://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @classmethod
    def start(cls, root: Path, *, timeout: float = 60.0) -> LocalPostgres:
        """initdb a new cluster and start it; the server log goes to ``root/postgres.log``."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        run_as = _run_as_kwargs()
        if run_as:
            # The postgres user cannot reach into root's private temp dirs (pytest's are
            # 0700): give it a directory of its own in the world-traversable temp dir.
            base_dir = Path(tempfile.mkdtemp(prefix="datamover-pg-"))
            os.chown(base_dir, run_as["user"], run_as["group"])
        else:
            base_dir = Path(tempfile.mkdtemp(prefix="pg-", dir=root))
        pg = cls(
            base_dir=base_dir,
            port=free_loopback_ports(1)[0],
            log_path=root / "postgres.log",
            _remove_base_dir=bool(run_as),
        )
        try:
            pg._initdb(run_as, timeout=timeout)
            pg._launch(run_as, timeout=timeout)
        except BaseException:
            pg.stop()
            raise
        return pg

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: roll back sessions, checkpoint), SIGKILL after timeout."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("PostgreSQL did not stop within %.0fs; killing it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._remove_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._remove_base_dir = False

    def _initdb(self, run_as: dict[str, Any], *, timeout: float) -> None:
        argv = [
            str(postgres_bin_dir() / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        ]
        try:
            done = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                timeout=timeout,
                check=False,
                **run_as,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"initdb took longer than {timeout:.0f}s") from exc
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace").strip()
            raise PostgresError(f"initdb failed (exit {done.returncode}):\n{output}")
        self.socket_dir.mkdir()
        if run_as:
            os.chown(self.socket_dir, run_as["user"], run_as["group"])

    def _launch(self, run_as: dict[str, Any], *, timeout: float) -> None:
        for attempt in range(1, _PORT_PICK_ATTEMPTS + 1):
            try:
                self._launch_once(run_as, timeout=timeout)
                return
            except PostgresError as exc:
                # Another process may take the picked port between the pick and the bind.
                if "could not bind" not in str(exc) or attempt == _PORT_PICK_ATTEMPTS:
                    raise
                log.warning("PostgreSQL port %d taken, picking another", self.port)
                self.port = free_loopback_ports(1)[0]

    def _launch_once(self, run_as: dict[str, Any], *, timeout: float) -> None:
        argv = [
            str(postgres_bin_dir() / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.socket_dir),
        ]
        for key, value in SERVER_SETTINGS.items():
            argv += ["-c", f"{key}={value}"]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        started_at = time.monotonic()
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,
                # SIGINT: a fast shutdown, should this process die without stopping it.
                preexec_fn=die_with_parent(signal.SIGINT),
                **run_as,
            )
        try:
            self._wait_ready(log_start, deadline=started_at + timeout)
        except BaseException:
            proc, self.process = self.process, None
            assert proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        log.info(
            "PostgreSQL ready at 127.0.0.1:%d in %.1fs", self.port, time.monotonic() - started_at
        )

    def _wait_ready(self, log_start: int, *, deadline: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise PostgresError(
                    f"PostgreSQL exited with {self.process.returncode} before it was ready\n"
                    f"{log_tail(self.log_path, start=log_start)}"
                )
            if self._ready(log_start):
                return
            if time.monotonic() > deadline:
                raise PostgresError(
                    "PostgreSQL not ready after the timeout\n"
                    f"{log_tail(self.log_path, start=log_start)}"
                )
            time.sleep(0.1)

    def _ready(self, log_start: int) -> bool:
        with self.log_path.open("rb") as f:
            f.seek(log_start)
            if READY_LINE not in f.read():
                return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False
