"""Local Datamover sites: single-node Apache Kafka clusters (KRaft) run from the Maven jars.

For trying Datamover on one machine and for tests. Each site is one JVM that is both broker
and controller, listening on loopback ports, with its data, config and log in one directory.
The jars come from ``deploy/kafka/lib`` (``make setup``), or from ``DATAMOVER_KAFKA_LIB``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
SERVER_PROPERTIES_TEMPLATE = KAFKA_DEPLOY_DIR / "server.properties.template"
LOG4J2_CONFIG = KAFKA_DEPLOY_DIR / "log4j2.properties"
KAFKA_LIB_ENV = "DATAMOVER_KAFKA_LIB"
CDS_ENV = "DATAMOVER_KAFKA_CDS"

READY_LINE = b"Kafka Server started"
# 8 MiB of payload plus room for the record batch and request headers.
DEFAULT_MESSAGE_MAX_BYTES = 8 * 1024 * 1024 + 64 * 1024
# Besides these, the heap is fixed at its maximum (-Xms = -Xmx, see KafkaSite._spawn).
JVM_FLAGS = (
    # The client-level JIT only: a local site is short-lived and shares a small machine,
    # and the optimizing compiler's warm-up costs more CPU than its code saves here
    # (measured: a fresh broker took 7.7 s of CPU for its first 512 MiB with it, 4.4 s
    # without, and about 3 s either way once warm).
    "-XX:TieredStopAtLevel=1",
    # Produce requests carry records of 1-8 MiB: for G1 (1 MiB regions at this heap size)
    # each is a humongous object, and reclaiming them kept its concurrent marking threads
    # at 15-20 % of a core; the parallel collector allocates them in the young generation.
    "-XX:+UseParallelGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
LOG_TAIL_LINES = 40
_PORT_PICK_ATTEMPTS = 3


class SiteError(RuntimeError):
    """A local site could not be set up, started or stopped; the message says why."""


def kafka_lib_dir() -> Path:
    """The directory of the broker jars, checked to hold them."""
    lib = Path(os.environ.get(KAFKA_LIB_ENV) or KAFKA_DEPLOY_DIR / "lib")
    if not any(lib.glob("kafka_2.13-*.jar")):
        raise SiteError(
            f"no Kafka broker jars (kafka_2.13-*.jar) in {lib}: run `make setup` "
            f"or point {KAFKA_LIB_ENV} at a directory holding them"
        )
    return lib


def java_executable() -> str:
    """``$JAVA_HOME/bin/java`` when JAVA_HOME is set, else ``java`` from PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise SiteError("no java: install a JRE >= 17 or set JAVA_HOME")
    return found


def class_archive(java: str, lib: Path) -> Path | None:
    """Where the class-data-sharing archive of the broker for this JVM and these jars lives.

    A JVM spends most of its start loading and verifying classes. The first broker run
    dumps the classes it loaded into this archive (in ``~/.cache/datamover``) when it
    stops; later starts map it and boot about 40% faster (measured on 2 cores). The name
    holds a fingerprint of the JVM and the jars, so an upgrade makes a new archive (and
    the JVM itself ignores an archive that does not match). None when
    ``DATAMOVER_KAFKA_CDS=off``.
    """
    if os.environ.get(CDS_ENV, "").lower() in ("0", "off", "false", "no"):
        return None
    fingerprint = hashlib.sha256()
    for path in [Path(java).resolve(), *sorted(lib.glob("*.jar"))]:
        stat = path.stat()
        fingerprint.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "datamover"
    return cache / f"kafka-classes-{fingerprint.hexdigest()[:16]}.jsa"


def free_loopback_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now, all distinct (held open together while picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        # Kafka's own generator avoids a leading '-', which command lines take for a flag.
        if not cluster_id.startswith("-"):
            return cluster_id


def read_cluster_id(log_dirs: Path) -> str | None:
    """The cluster id of an already formatted log directory, or None if it is not formatted."""
    meta = log_dirs / "meta.properties"
    if not meta.is_file():
        return None
    for line in meta.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    raise SiteError(f"{meta} has no cluster.id")


# Lines that say why a JVM failed: log records at ERROR/FATAL and the exception headers
# below them ("...Exception: message", "Caused by: ..."), not the stack frames.
_REASON_LINE = re.compile(r"\b(ERROR|FATAL)\b|^(Caused by: )?[\w.$]+(Exception|Error)\b")


def log_tail(path: Path, *, start: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """Why a server failed: the reason lines of its log, then its last lines, from ``start``."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    all_lines = text.splitlines()
    reasons = list(dict.fromkeys(line for line in all_lines if _REASON_LINE.search(line)))
    parts = []
    if reasons:
        parts.append("reasons in the log:\n" + "\n".join(reasons[:20]))
    parts.append(f"last lines of {path}:\n" + "\n".join(all_lines[-lines:]))
    return "\n".join(parts)


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _run_checked(argv: list[str], *, what: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SiteError(f"{what} took longer than {timeout:.0f}s") from exc
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace").strip()
        raise SiteError(f"{what} failed (exit {done.returncode}):\n{output}")


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child get ``sig`` when this process dies (Linux).

    So a test run killed with SIGKILL leaves no broker or database behind. Only from the
    main thread: the kernel sends the signal when the *thread* that forked exits, and only
    the main thread lives as long as the process. Elsewhere, None (no such guard).
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before the guard was set
            os.kill(os.getpid(), sig)

    return preexec


@dataclass(eq=False)
class KafkaSite:
    """One local single-node KRaft cluster (broker and controller in one JVM)."""

    name: str
    data_dir: Path
    port: int
    controller_port: int
    cluster_id: str
    heap: str = "256m"
    message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _ports_movable: bool = field(default=False, repr=False)
    # (being written, final name) while this run dumps the class archive at exit.
    _archive_dump: tuple[Path, Path] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dirs(self) -> Path:
        return self.data_dir / "kafka-logs"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @classmethod
    def start(
        cls,
        name: str,
        root: Path,
        *,
        port: int = 0,
        controller_port: int = 0,
        heap: str = "256m",
        timeout: float = 60.0,
    ) -> KafkaSite:
        """Start the site ``name`` in ``root/name``, formatting it first if it is new.

        Ports given as 0 are picked free on loopback; when both were picked, they are
        picked again if another process takes one before the broker binds it. An existing
        data directory is reused with its cluster id, so a site started again on the same
        directory keeps its topics.
        """
        site = cls.prepare(
            name, root, port=port, controller_port=controller_port, heap=heap, timeout=timeout
        )
        site._launch(timeout=timeout, may_move=site._ports_movable)
        return site

    @classmethod
    def prepare(
        cls,
        name: str,
        root: Path,
        *,
        port: int = 0,
        controller_port: int = 0,
        heap: str = "256m",
        timeout: float = 60.0,
    ) -> KafkaSite:
        """Everything :meth:`start` does before it runs the broker: ports, config, format."""
        data_dir = Path(root) / name
        data_dir.mkdir(parents=True, exist_ok=True)
        free = iter(free_loopback_ports(2))
        log_dirs = data_dir / "kafka-logs"
        site = cls(
            name=name,
            data_dir=data_dir,
            port=port or next(free),
            controller_port=controller_port or next(free),
            cluster_id=read_cluster_id(log_dirs) or new_cluster_id(),
            heap=heap,
            # Only a site whose ports were all picked here may move to others on a clash.
            _ports_movable=port == 0 and controller_port == 0,
        )
        site._write_config()
        if read_cluster_id(log_dirs) is None:
            site._format(timeout=timeout)
        return site

    def restart(self, timeout: float = 60.0) -> None:
        """Stop (if running) and start again on the same directory and ports.

        Clients keep the same bootstrap address, so a port taken meanwhile is an error.
        """
        self.stop()
        self._launch(timeout=timeout, may_move=False)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait up to ``timeout`` for a clean shutdown, then SIGKILL."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            self.process = None
            self._settle_archive(clean_exit=False)
            return
        self._signal(signal.SIGTERM)
        clean_exit = True
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("site %s did not stop within %.0fs; killing it", self.name, timeout)
            clean_exit = False
            self._signal(signal.SIGKILL)
            proc.wait()
        self.process = None
        self._settle_archive(clean_exit=clean_exit)
        log.info("site %s stopped", self.name)

    def kill(self) -> None:
        """SIGKILL: the site dies as in a crash or power loss (for outage tests)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            self._signal(signal.SIGKILL)
            proc.wait()
            log.info("site %s killed", self.name)
        self.process = None
        self._settle_archive(clean_exit=False)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        # The broker runs in its own process group: signal the group we created. It may
        # have exited (and been reaped) since we checked.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def _write_config(self) -> None:
        template = Template(SERVER_PROPERTIES_TEMPLATE.read_text())
        self.config_path.write_text(
            template.substitute(
                port=self.port,
                controller_port=self.controller_port,
                log_dirs=self.log_dirs,
                message_max_bytes=self.message_max_bytes,
            )
        )

    def _classpath(self) -> str:
        return str(kafka_lib_dir() / "*")

    def _class_sharing_flags(self, *, may_dump: bool) -> list[str]:
        archive = class_archive(java_executable(), kafka_lib_dir())
        if archive is None:
            return []
        if archive.exists():
            return [f"-XX:SharedArchiveFile={archive}"]
        if not may_dump or self._archive_dump is not None:
            return []
        archive.parent.mkdir(parents=True, exist_ok=True)
        # Each run dumps to its own file: two sites may be making the archive at once.
        dump = archive.with_name(f"{archive.name}.{uuid.uuid4().hex[:8]}.partial")
        self._archive_dump = (dump, archive)
        return [f"-XX:ArchiveClassesAtExit={dump}"]

    def _settle_archive(self, *, clean_exit: bool) -> None:
        """Publish the class archive this run dumped at exit; drop it after a crash."""
        pending, self._archive_dump = self._archive_dump, None
        if pending is None:
            return
        dump, archive = pending
        if clean_exit and dump.is_file() and dump.stat().st_size > 0:
            os.replace(dump, archive)
            log.info("saved the Kafka class archive %s", archive)
        else:
            dump.unlink(missing_ok=True)

    def _format(self, *, timeout: float) -> None:
        # A static quorum (controller.quorum.voters in the config) is formatted without
        # --standalone/--initial-controllers; those are for dynamic quorums only.
        _run_checked(
            [
                java_executable(),
                "-Xmx128m",
                *self._class_sharing_flags(may_dump=False),
                "-cp",
                self._classpath(),
                f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                self.cluster_id,
                "--config",
                str(self.config_path),
            ],
            what=f"formatting Kafka storage of site {self.name} in {self.log_dirs}",
            timeout=timeout,
        )

    def _launch(self, *, timeout: float, may_move: bool) -> None:
        for attempt in range(1, _PORT_PICK_ATTEMPTS + 1):
            try:
                self._launch_once(timeout=timeout)
                return
            except SiteError as exc:
                # Another process may take a picked port between the pick and the bind.
                if not (may_move and "Address already in use" in str(exc)):
                    raise
                if attempt == _PORT_PICK_ATTEMPTS:
                    raise
                log.warning("site %s: port taken, picking other ports", self.name)
                self.port, self.controller_port = free_loopback_ports(2)
                self._write_config()

    def _launch_once(self, *, timeout: float) -> None:
        self._await_ready(self._spawn(), timeout=timeout)

    def _spawn(self) -> tuple[int, float]:
        """Run the broker; return where its output starts in the log, and when."""
        argv = [
            java_executable(),
            f"-Xmx{self.heap}",
            # The whole heap from the start: grown from 64 MiB, the parallel collector's
            # sizing ran a full collection (107-175 ms, every request of the broker
            # waiting) in the first seconds of a workload, and young collections were
            # more frequent; measured end to end: RPO p99 186-196 ms against 261-262,
            # 24.4 ms of CPU per MB protected against 27.2-28.7.
            f"-Xms{self.heap}",
            *JVM_FLAGS,
            *self._class_sharing_flags(may_dump=True),
            "-cp",
            self._classpath(),
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "kafka.Kafka",
            str(self.config_path),
        ]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        return log_start, time.monotonic()

    def _await_ready(self, spawned: tuple[int, float], *, timeout: float) -> None:
        log_start, started_at = spawned
        try:
            self._wait_ready(log_start, deadline=started_at + timeout)
        except BaseException:
            self.kill()
            raise
        log.info(
            "site %s ready at %s in %.1fs (log %s)",
            self.name,
            self.bootstrap,
            time.monotonic() - started_at,
            self.log_path,
        )

    def _wait_ready(self, log_start: int, *, deadline: float) -> None:
        assert self.process is not None
        seen_ready = False
        while True:
            if self.process.poll() is not None:
                raise SiteError(
                    f"Kafka site {self.name} exited with {self.process.returncode} "
                    f"before it was ready\n{log_tail(self.log_path, start=log_start)}"
                )
            if not seen_ready:
                seen_ready = self._log_contains(READY_LINE, log_start)
            if seen_ready and _tcp_accepts(self.port):
                return
            if time.monotonic() > deadline:
                raise SiteError(
                    f"Kafka site {self.name} not ready after the timeout "
                    f"(ready line seen: {seen_ready})\n{log_tail(self.log_path, start=log_start)}"
                )
            time.sleep(0.1)

    def _log_contains(self, needle: bytes, start: int) -> bool:
        with self.log_path.open("rb") as f:
            f.seek(start)
            return needle in f.read()


@dataclass(eq=False)
class LocalSites:
    """A source and a target site side by side, as on one machine for trying and testing."""

    source: KafkaSite
    target: KafkaSite

    @classmethod
    def start(cls, root: Path, *, timeout: float = 90.0) -> LocalSites:
        """Start both sites side by side; if either fails, stop the other and raise."""
        names = ("source", "target")
        # Formatting runs a JVM to completion: both at once, in threads.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kafka-site") as pool:
            prepared = [
                pool.submit(KafkaSite.prepare, n, Path(root), timeout=timeout) for n in names
            ]
        sites = [future.result() for future in prepared]
        # The brokers are spawned from this thread (see die_with_parent) and boot together.
        try:
            failures = cls._boot_together(sites, timeout=timeout)
        except BaseException:
            for site in sites:
                site.stop()
            raise
        if failures:
            for site in sites:
                site.stop()
            raise SiteError("\n\n".join(failures))
        return cls(source=sites[0], target=sites[1])

    @staticmethod
    def _boot_together(sites: list[KafkaSite], *, timeout: float) -> list[str]:
        """Spawn every broker, then wait for each; return why those that failed did."""
        spawned = [site._spawn() for site in sites]
        failures: list[str] = []
        for site, spawn in zip(sites, spawned, strict=True):
            try:
                site._await_ready(spawn, timeout=timeout)
            except SiteError as exc:
                if not (site._ports_movable and "Address already in use" in str(exc)):
                    failures.append(f"site {site.name}: {exc}")
                    continue
                try:
                    site.port, site.controller_port = free_loopback_ports(2)
                    site._write_config()
                    site._launch(timeout=timeout, may_move=True)
                except SiteError as again:
                    failures.append(f"site {site.name}: {again}")
        return failures

    def __iter__(self) -> Iterator[KafkaSite]:
        return iter((self.source, self.target))

    def stop(self) -> None:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kafka-site-stop") as pool:
            for future in [pool.submit(site.stop) for site in self]:
                future.result()
