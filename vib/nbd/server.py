"""The NBD server: listening sockets, the connections they accept, orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat

from prometheus_client import CollectorRegistry

from vib.nbd import protocol as p
from vib.nbd.catalog import ExportCatalog, ExportSource
from vib.nbd.connection import NbdConnection, PayloadBudget, ServerContext
from vib.nbd.handshake import BlockSizes
from vib.nbd.metrics import NbdMetrics
from vib.nbd.rate_limited_log import RateLimitedLog

logger = logging.getLogger(__name__)


class NbdServer:
    """Serves `exports` (a name -> Export mapping, or a function resolving a name to an
    Export or None, possibly a coroutine function) over NBD. The empty export name means
    `default_export`. Requests carrying more than `max_request_bytes` of data are refused.
    """

    def __init__(
        self,
        exports: ExportSource,
        *,
        default_export: str | None = None,
        max_request_bytes: int = p.DEFAULT_MAX_PAYLOAD,
        handshake_timeout: float = 10.0,
        shutdown_timeout: float = 30.0,
        max_connections: int = 1024,
        payload_budget_bytes: int = 256 * 1024 * 1024,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`max_connections`: connections served at once (more are closed on arrival);
        `payload_budget_bytes`: write payloads received into buffers of their own, all
        connections together (see `connection.PayloadBudget`)."""
        if not p.DEFAULT_PREFERRED_BLOCK <= max_request_bytes <= 0xFFFFFFFF:
            raise ValueError(
                f"max_request_bytes must be between {p.DEFAULT_PREFERRED_BLOCK} and 2^32-1"
            )
        if max_connections < 1 or payload_budget_bytes < 0:
            raise ValueError("max_connections must be >= 1 and payload_budget_bytes >= 0")
        self._max_connections = max_connections
        self.metrics = NbdMetrics(registry)
        self._shutdown_timeout = shutdown_timeout
        self._listeners: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._connections: set[NbdConnection] = set()
        self._closing = False
        self._context = ServerContext(
            catalog=ExportCatalog(exports, default_export),
            block_sizes=BlockSizes(maximum_payload=max_request_bytes),
            max_request_bytes=max_request_bytes,
            handshake_timeout=handshake_timeout,
            metrics=self.metrics,
            log=RateLimitedLog(logger),
            shutting_down=lambda: self._closing,
            on_finished=self._connections.discard,
            payloads=PayloadBudget(payload_budget_bytes),
        )

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _accept(self) -> asyncio.BaseProtocol:
        if len(self._connections) >= self._max_connections:
            self.metrics.violation("too_many_connections")
            self._context.log.warning(
                "NBD: %d connections already; closing a new one", len(self._connections)
            )
            return _Refused()
        connection = NbdConnection(self._context)
        self._connections.add(connection)
        return connection

    async def serve_tcp(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        self._check_open()
        listener = await asyncio.get_running_loop().create_server(
            self._accept, host, port, reuse_address=True
        )
        self._listeners.append(listener)
        bound: int = listener.sockets[0].getsockname()[1]
        logger.info("NBD server listening on %s:%d", host, bound)
        return bound

    async def serve_unix(self, path: str) -> None:
        """Listen on a Unix socket at `path` (a stale socket file there is replaced)."""
        self._check_open()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        listener = await asyncio.get_running_loop().create_unix_server(self._accept, path)
        self._listeners.append(listener)
        self._unix_paths.append(path)
        logger.info("NBD server listening on %s", path)

    async def close(self) -> None:
        """Stop accepting, let requests already started finish (up to shutdown_timeout),
        then close every connection."""
        if self._closing:
            return
        self._closing = True
        for listener in self._listeners:
            listener.close()
        for connection in list(self._connections):
            connection.shutdown()
        pending = [c.finished for c in self._connections]
        if pending:
            _, late = await asyncio.wait(pending, timeout=self._shutdown_timeout)
            if late:
                logger.warning("NBD shutdown: %d connections did not finish; aborting", len(late))
                for connection in list(self._connections):
                    connection.abort()
                await asyncio.wait(late, timeout=5.0)
        for listener in self._listeners:
            await listener.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        logger.info("NBD server closed")

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError("the NBD server is closed")


class _Refused(asyncio.Protocol):
    """A connection over the limit: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
