"""One NBD client connection: handshake, then the request loop.

The request loop is the hot path. It is an asyncio.BufferedProtocol: the kernel
receives into our own buffer, every request that has fully arrived is parsed and
started inline, export coroutines that finish without suspending (the usual case for a
page-cache write) are answered at once, and all replies produced by one batch of input
leave in one write. Only a coroutine that really suspends gets a Task. Replies may go
out of order, as the protocol allows. A large write payload is received straight into
a buffer of its own size, which then goes to the export without another copy.

Back-pressure: reading stops while the transport's send buffer is full, while too many
requests (or too many bytes of them) are suspended in the export, after NBD_CMD_DISC,
and during shutdown. A payload gets a buffer of its own only within a server-wide
budget (`PayloadBudget`); beyond it, it is received into the connection's buffer as it
arrives, so memory follows what clients really sent, not what their headers announce.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from vib._fast_writes import payload_buffer
from vib.nbd import protocol as p
from vib.nbd import replies
from vib.nbd.catalog import ExportCatalog
from vib.nbd.eager import Suspended
from vib.nbd.errors import PeerGone, ProtocolViolation, ServerShuttingDown
from vib.nbd.export import Export, ExportError, WriteRun, nbd_error_for
from vib.nbd.handshake import BlockSizes, Negotiation, Session
from vib.nbd.metrics import NbdMetrics
from vib.nbd.rate_limited_log import RateLimitedLog

logger = logging.getLogger(__name__)

# Reasons to stop reading from the socket (bit set).
_PAUSE_SEND_BUFFER_FULL = 1  # the client is not reading its replies
_PAUSE_BACKLOG = 2  # too many requests suspended in the export
_PAUSE_STOPPED = 4  # NBD_CMD_DISC received, shutting down, or closing
_PAUSE_HANDSHAKE_BUFFER = 8  # handshake input beyond anything an option needs

_HANDSHAKE_BUFFER_LIMIT = 256 * 1024
# The receive buffer, and the room kept free at its end for each receive.
_RECEIVE_BUFFER = 256 * 1024
_MIN_RECEIVE = 64 * 1024
# Write payloads at least this large and not yet fully received get a buffer of their
# own that the rest is received into directly.
_DIRECT_PAYLOAD = 64 * 1024
# Replies are sent at the end of each input batch, or sooner once this much is queued.
_SEND_THRESHOLD = 1024 * 1024
# Suspended requests allowed per connection before reading stops, and the bytes their
# data may take (a suspended write holds its payload; a read will hold its reply).
_MAX_SUSPENDED = 512
_MAX_SUSPENDED_BYTES = 64 * 1024 * 1024
# After the last reply of a closing connection, how long its client has to read them.
_CLOSE_GRACE_S = 30.0
# Requests whose data a suspended task holds (a write its payload, a read its reply).
_DATA_COMMANDS = frozenset((p.CMD_WRITE, p.CMD_READ))
_UNKNOWN_COMMAND = len(p.COMMAND_NAMES)  # index of the "unknown" request counter
_METRICS_INTERVAL = 1.0  # seconds between folding counts into Prometheus

_CMD_WRITE = p.CMD_WRITE
_FUA = p.CMD_FLAG_FUA
_REQUEST_MAGIC = p.REQUEST_MAGIC
_SIMPLE_REPLY_MAGIC = p.SIMPLE_REPLY_MAGIC
_unpack_request = p.REQUEST_HEADER.unpack_from
_pack_simple = p.SIMPLE_REPLY.pack
_REQUEST_SIZE = p.REQUEST_HEADER.size


class PayloadBudget:
    """Bytes of write payloads being received into buffers of their own, server-wide.

    Such a buffer is allocated at its full size when the request's header arrives: a
    client announcing 32 MiB and sending nothing more would otherwise pin 32 MiB per
    connection for as long as it likes."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True, slots=True)
class ServerContext:
    """What every connection of one server shares."""

    catalog: ExportCatalog
    block_sizes: BlockSizes
    max_request_bytes: int
    handshake_timeout: float
    metrics: NbdMetrics
    log: RateLimitedLog
    shutting_down: Callable[[], bool]
    on_finished: Callable[[NbdConnection], None]
    payloads: PayloadBudget


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(self, context: ServerContext) -> None:
        self._ctx = context
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        # Received bytes live in _rbuf[_rstart:_rend].
        self._rbuf = bytearray(_RECEIVE_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        # A large write payload being received in place: (flags, cookie, offset).
        self._payload: bytearray | None = None
        self._payload_view = memoryview(b"")
        self._payload_filled = 0
        self._payload_request = (0, 0, 0)
        # Set when such a payload of at least the receive buffer's size is complete: the
        # next request's header is received alone, so that if it is another such write
        # its payload goes whole to a buffer of its own, rather than in part here and
        # then copied there (up to a quarter of each 1 MiB write). It costs one more
        # receive per write: below this size, where the copy it would save is smaller,
        # writes keep sharing receives.
        self._header_first = False
        self._pause = 0
        self._reading_paused = False
        self._lost = False
        self._eof = False
        # Set once the transport is gone and no request is left running.
        self.finished: asyncio.Future[None] = self._loop.create_future()
        # Handshake phase.
        self._handshake_task: asyncio.Task[None] | None = None
        self._want = 0
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        # Transmission phase (set by _start_transmission).
        self._transmitting = False
        self._export: Export | None = None
        self._write_run: WriteRun | None = None
        self._export_name = ""
        self._size = 0
        self._structured = False
        self._read_only = True
        self._context_id = 0
        self._allowed_flags: tuple[int, ...] = ()
        self._max_request = context.max_request_bytes
        # Oversized writes are skipped rather than buffered; their error reply is sent
        # once the payload has gone by.
        self._discard = 0
        self._discard_cookie = 0
        self._discard_error = (p.NBD_EINVAL, "")
        self._tasks: set[asyncio.Task[None]] = set()
        self._suspended_bytes = 0
        # Outgoing replies of the current batch.
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._in_batch = False
        self._send_scheduled = False
        # Counted here, added to Prometheus at most once per _METRICS_INTERVAL.
        self._request_counts = [0] * (len(p.COMMAND_NAMES) + 1)
        self._bytes_read = 0
        self._bytes_written = 0
        self._metrics_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self._ctx.metrics.connections.inc()
        self._ctx.metrics.active_connections.inc()
        self._handshake_task = self._loop.create_task(self._handshake())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            return self._payload_view[self._payload_filled :]
        start, end = self._rstart, self._rend
        if start == end:
            self._rstart = self._rend = start = end = 0
            if len(self._rbuf) > _RECEIVE_BUFFER:
                # Grown for a payload received here (past the payload budget): not kept
                # for the life of the connection.
                self._rbuf = bytearray(_RECEIVE_BUFFER)
                self._rview = memoryview(self._rbuf)
        if len(self._rbuf) - end < _MIN_RECEIVE:
            # Move the unparsed tail (a partial request, normally small) to the front,
            # and grow only if that is not enough (input held back by a pause).
            pending = end - start
            if start:
                self._rbuf[:pending] = self._rview[start:end]
                self._rstart, self._rend = 0, pending
            if len(self._rbuf) - pending < _MIN_RECEIVE:
                # Doubling: a large payload received here (the payload budget was spent)
                # must not be copied over again for every 256 KiB that arrives.
                bigger = bytearray(max(pending + _RECEIVE_BUFFER, 2 * len(self._rbuf)))
                bigger[:pending] = self._rview[:pending]
                self._rbuf = bigger
                self._rview = memoryview(bigger)
        if self._header_first:
            return self._rview[self._rend : self._rstart + _REQUEST_SIZE]
        return self._rview[self._rend :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload is not None:
            self._payload_filled += nbytes
            if self._payload_filled == len(self._payload):
                self._payload_received()
            return
        self._rend += nbytes
        if self._header_first and self._rend - self._rstart >= _REQUEST_SIZE:
            self._header_first = False
        if self._transmitting:
            self._process()
            return
        waiter = self._read_waiter
        pending = self._rend - self._rstart
        if waiter is not None and pending >= self._want and not waiter.done():
            waiter.set_result(None)
        if pending >= _HANDSHAKE_BUFFER_LIMIT:
            self._set_pause(_PAUSE_HANDSHAKE_BUFFER, True)

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake_reader()
        if not self._transmitting:
            return None  # during the handshake: nothing is owed, let the transport close
        # A client that shut down its sending side still reads: every request it sent
        # is answered (those held back by a pause too), then the connection closes.
        self._loop.call_soon(self._finish_after_eof)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self._transmitting = False
        self._pause |= _PAUSE_STOPPED
        self._out.clear()
        self._rstart = self._rend = 0
        if self._payload is not None:
            self._ctx.payloads.release(len(self._payload))
            self._payload = None
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(PeerGone())
            self._drain_waiter.exception()  # retrieved even if nobody awaits it
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        self._flush_metrics()
        self._ctx.metrics.active_connections.dec()
        self._maybe_finished()

    def pause_writing(self) -> None:
        self._set_pause(_PAUSE_SEND_BUFFER_FULL, True)

    def resume_writing(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._set_pause(_PAUSE_SEND_BUFFER_FULL, False)

    # --- lifecycle ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop taking requests; those already started finish, then the connection
        closes. A connection still negotiating is closed at once."""
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
            return
        self._set_pause(_PAUSE_STOPPED, True)
        self._close_when_idle()

    def abort(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def _close_when_idle(self) -> None:
        if self._tasks or self._transport is None or self._lost:
            return
        self._send()
        self._transport.close()
        # close() waits for the replies to be read: not forever.
        self._loop.call_later(_CLOSE_GRACE_S, self.abort)

    def _finish_after_eof(self) -> None:
        """After the client's EOF: close once everything it sent is answered."""
        if self._lost or self._tasks or self._pause & ~_PAUSE_SEND_BUFFER_FULL:
            return  # _task_done (or the end of the pause) comes back here
        if self._rend > self._rstart and not self._in_batch:
            self._process()  # requests held back by a pause; may start tasks
            if self._tasks:
                return
        self._close_when_idle()

    def _maybe_finished(self) -> None:
        if self._lost and not self._tasks and not self.finished.done():
            self.finished.set_result(None)
            self._ctx.on_finished(self)

    def _set_pause(self, reason: int, on: bool) -> None:
        was = self._pause
        self._pause = was | reason if on else was & ~reason
        transport = self._transport
        if transport is None or self._lost:
            return
        if self._pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not self._pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
            if self._transmitting and self._rend > self._rstart:
                # Requests that arrived before the pause are still waiting.
                self._loop.call_soon(self._process)

    def _violation(self, kind: str, detail: str) -> None:
        self._ctx.metrics.violation(kind)
        self._ctx.log.warning("NBD client %s: %s; disconnecting", self.peer, detail)
        self._transmitting = False
        self._pause |= _PAUSE_STOPPED
        self.abort()

    # --- handshake ------------------------------------------------------------------------

    async def read_exact(self, length: int) -> bytes:
        while self._rend - self._rstart < length:
            if self._eof:
                raise PeerGone()
            self._want = length
            self._read_waiter = self._loop.create_future()
            await self._read_waiter
        start = self._rstart
        self._rstart = start + length
        if self._rend - self._rstart < _HANDSHAKE_BUFFER_LIMIT:
            self._set_pause(_PAUSE_HANDSHAKE_BUFFER, False)
        return bytes(self._rview[start : start + length])

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._lost:
            self._transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise PeerGone()
        if self._pause & _PAUSE_SEND_BUFFER_FULL:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    async def _handshake(self) -> None:
        ctx = self._ctx
        negotiation = Negotiation(
            self, ctx.catalog, block_sizes=ctx.block_sizes, shutting_down=ctx.shutting_down
        )
        try:
            async with asyncio.timeout(ctx.handshake_timeout):
                session = await negotiation.run()
        except ProtocolViolation as violation:
            self._violation(violation.kind, f"handshake: {violation.detail}")
            return
        except PeerGone:
            logger.debug("NBD client %s left during the handshake", self.peer)
            return
        except ServerShuttingDown:
            self.abort()
            return
        except TimeoutError:
            self._violation("handshake_timeout", "handshake not finished in time")
            return
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            ctx.log.error("NBD handshake with %s failed", self.peer, exc_info=True)
            self.abort()
            return
        finally:
            self._read_waiter = None
            self._drain_waiter = None
        if session is None:  # NBD_OPT_ABORT
            if self._transport is not None and not self._lost:
                self._transport.close()
            return
        self._start_transmission(session)

    def _start_transmission(self, session: Session) -> None:
        export = session.export
        self._export = export
        self._write_run = None if export.read_only else getattr(export, "write_run", None)
        self._export_name = session.export_name
        self._size = export.size
        self._structured = session.structured_replies
        self._read_only = export.read_only
        self._context_id = session.allocation_context or 0
        flags = session.transmission_flags
        fua = p.CMD_FLAG_FUA if flags & p.FLAG_SEND_FUA else 0
        df = p.CMD_FLAG_DF if flags & p.FLAG_SEND_DF else 0
        # Command flags each command accepts; FUA is valid on every command once offered.
        self._allowed_flags = (
            fua | df,  # READ
            fua,  # WRITE
            fua,  # DISC
            fua,  # FLUSH
            fua,  # TRIM
            fua,  # CACHE
            fua | p.CMD_FLAG_NO_HOLE,  # WRITE_ZEROES
            fua | p.CMD_FLAG_REQ_ONE,  # BLOCK_STATUS
        )
        self._can_flush = bool(flags & p.FLAG_SEND_FLUSH)
        self._can_trim = bool(flags & p.FLAG_SEND_TRIM)
        self._can_zero = bool(flags & p.FLAG_SEND_WRITE_ZEROES)
        self._can_cache = bool(flags & p.FLAG_SEND_CACHE)
        logger.debug(
            "NBD client %s: export %r, flags %#x, structured replies %s",
            self.peer,
            session.export_name,
            flags,
            session.structured_replies,
        )
        self._set_pause(_PAUSE_HANDSHAKE_BUFFER, False)
        self._transmitting = True
        if self._rend > self._rstart and not self._pause:
            self._process()

    # --- transmission: parsing ----------------------------------------------------------

    def _process(self) -> None:
        """Start every request that has fully arrived, then send the replies."""
        if not self._transmitting or self._pause:
            return
        export = self._export
        assert export is not None
        buf = self._rbuf
        pos = self._rstart
        end = self._rend
        # Writes are the hot path: their checks and inline completion are spelled out
        # here with locals rather than behind method calls.
        out = self._out
        export_write = export.write
        write_run = self._write_run
        # Handed to write_run until a run fills it (then it is queued and replaced).
        replies = bytearray()
        counts = self._request_counts
        max_request = self._max_request
        writable_size = -1 if self._read_only else self._size
        write_flags = self._allowed_flags[_CMD_WRITE]
        self._in_batch = True
        try:
            while not self._pause:
                if self._discard:
                    skipped = min(self._discard, end - pos)
                    pos += skipped
                    self._discard -= skipped
                    if self._discard:
                        break
                    self._reply_error(self._discard_cookie, _CMD_WRITE, *self._discard_error)
                    continue
                if end - pos < _REQUEST_SIZE:
                    break
                magic, flags, command, cookie, offset, length = _unpack_request(buf, pos)
                if magic != _REQUEST_MAGIC:
                    self._violation("request_magic", f"bad request magic {magic:#x}")
                    return
                if command != _CMD_WRITE:
                    pos += _REQUEST_SIZE
                    self._dispatch(command, flags, cookie, offset, length)
                elif length > max_request:
                    pos += _REQUEST_SIZE
                    self._oversized_write(cookie, length)
                    continue
                else:
                    if write_run is not None and not flags:
                        pos, run, run_bytes = write_run(buf, pos, end, replies, max_request)
                        if run:
                            counts[_CMD_WRITE] += run
                            self._bytes_written += run_bytes
                            out.append(replies)
                            replies = bytearray()
                            continue
                    start = pos + _REQUEST_SIZE
                    if flags & ~write_flags or offset + length > writable_size:
                        # Refused whatever it holds: its payload is skipped, here or as it
                        # arrives (never buffered), then the refusal is answered.
                        pos = start
                        counts[_CMD_WRITE] += 1
                        self._skip_refused_write(flags, cookie, length)
                        continue
                    if end - start < length:
                        # The rest of the payload is still on its way.
                        if length >= _DIRECT_PAYLOAD and self._ctx.payloads.reserve(length):
                            self._receive_payload_directly(flags, cookie, offset, length, start)
                            pos = end
                        break
                    pos = start + length
                    counts[_CMD_WRITE] += 1
                    self._bytes_written += length
                    coro = export_write(offset, memoryview(buf[start:pos]), flags == _FUA)
                    try:
                        yielded = coro.send(None)
                    except StopIteration:
                        out.append(_pack_simple(_SIMPLE_REPLY_MAGIC, 0, cookie))
                        continue
                    except Exception as exc:
                        self._reply_exception(cookie, _CMD_WRITE, exc)
                        continue
                    self._suspend(Suspended(coro, yielded), cookie, _CMD_WRITE, offset, length, 0)
                    continue
                if self._out_bytes >= _SEND_THRESHOLD:
                    self._send()
                    out = self._out
        finally:
            self._in_batch = False
            self._rstart = pos
        self._send()

    def _receive_payload_directly(
        self, flags: int, cookie: int, offset: int, length: int, start: int
    ) -> None:
        """Give the write whose payload begins at _rbuf[start] a buffer of its own; the
        rest of the payload is received into it (see get_buffer)."""
        received = self._rend - start
        # Not zeroed first: every byte of it is received over before it is used.
        payload = payload_buffer(length)
        payload[:received] = self._rview[start : self._rend]
        self._payload = payload
        self._payload_view = memoryview(payload)
        self._payload_filled = received
        self._payload_request = (flags, cookie, offset)

    def _payload_received(self) -> None:
        payload = self._payload
        assert payload is not None
        flags, cookie, offset = self._payload_request
        self._payload = None
        self._payload_view = memoryview(b"")
        length = len(payload)
        self._header_first = length >= _RECEIVE_BUFFER
        self._ctx.payloads.release(length)
        # Its flags and range were checked when its header arrived (_process).
        self._request_counts[_CMD_WRITE] += 1
        assert self._export is not None
        self._bytes_written += length
        coro = self._export.write(offset, memoryview(payload), flags == _FUA)
        self._start(coro, cookie, _CMD_WRITE, offset, length, flags)
        self._send()
        if self._rend > self._rstart:
            self._process()

    def _oversized_write(self, cookie: int, length: int) -> None:
        self._request_counts[_CMD_WRITE] += 1
        # Up to 32 MiB must not be treated as an attack: skip it and answer EINVAL.
        # Beyond that the spec lets us hang up rather than read it all.
        if length > max(self._max_request, p.DEFAULT_MAX_PAYLOAD):
            self._violation("oversized_write", f"WRITE of {length} bytes")
            return
        self._ctx.log.warning(
            "NBD client %s: WRITE of %d bytes exceeds the %d-byte limit",
            self.peer,
            length,
            self._max_request,
        )
        self._discard = length
        self._discard_cookie = cookie
        self._discard_error = (p.NBD_EINVAL, "")

    def _skip_refused_write(self, flags: int, cookie: int, length: int) -> None:
        """A refused write: its payload is skipped (never buffered), then the refusal is
        answered."""
        if not length:
            self._reply_error(cookie, _CMD_WRITE, *self._refusal(flags))
            return
        self._discard = length
        self._discard_cookie = cookie
        self._discard_error = self._refusal(flags)

    def _refusal(self, flags: int) -> tuple[int, str]:
        """Why a write with these flags, or beyond the end, is refused."""
        if flags & ~self._allowed_flags[_CMD_WRITE]:
            return p.NBD_EINVAL, f"bad flags {flags:#x}"
        if self._read_only:
            return p.NBD_EPERM, "the export is read-only"
        return p.NBD_ENOSPC, "write beyond the end"

    def _dispatch(self, command: int, flags: int, cookie: int, offset: int, length: int) -> None:
        export = self._export
        assert export is not None
        if command == p.CMD_DISC:
            # No reply, whatever the flags: the client sends nothing more either way.
            self._request_counts[command] += 1
            self._set_pause(_PAUSE_STOPPED, True)
            self._loop.call_soon(self._close_when_idle)
            return
        allowed = self._allowed_flags
        if command < len(allowed):
            self._request_counts[command] += 1
            if flags & ~allowed[command]:
                self._reply_error(cookie, command, p.NBD_EINVAL, f"bad flags {flags:#x}")
                return
        else:
            self._request_counts[_UNKNOWN_COMMAND] += 1
        end = offset + length
        coro: Any
        if command == p.CMD_READ:
            if end > self._size:
                self._reply_error(cookie, command, p.NBD_EINVAL, "read beyond the end")
                return
            if length > self._max_request:
                # Structured replies could split it, but the spec lets us refuse.
                error = p.NBD_EOVERFLOW if self._structured else p.NBD_EINVAL
                self._reply_error(cookie, command, error, f"read of {length} bytes is too large")
                return
            if length == 0:
                self._reply_read(cookie, offset, b"")
                return
            coro = export.read(offset, length)
        elif command == p.CMD_FLUSH:
            if not self._can_flush:
                self._reply_error(cookie, command, p.NBD_EINVAL, "flush was not offered")
                return
            coro = export.flush()
        elif command == p.CMD_WRITE_ZEROES or command == p.CMD_TRIM:
            if self._read_only:
                self._reply_error(cookie, command, p.NBD_EPERM, "the export is read-only")
                return
            if command == p.CMD_TRIM:
                if not self._can_trim:
                    self._reply_error(cookie, command, p.NBD_EINVAL, "trim was not offered")
                    return
                if end > self._size:
                    self._reply_error(cookie, command, p.NBD_EINVAL, "trim beyond the end")
                    return
            else:
                if not self._can_zero:
                    self._reply_error(cookie, command, p.NBD_EINVAL, "zeroing was not offered")
                    return
                if end > self._size:
                    self._reply_error(cookie, command, p.NBD_ENOSPC, "zeroing beyond the end")
                    return
            if length == 0:
                self._reply_ok(cookie)
                return
            fua = bool(flags & p.CMD_FLAG_FUA)
            if command == p.CMD_TRIM:
                coro = export.trim(offset, length, fua)
            else:
                may_trim = not flags & p.CMD_FLAG_NO_HOLE
                coro = export.write_zeroes(offset, length, may_trim=may_trim, fua=fua)
        elif command == p.CMD_BLOCK_STATUS:
            if not self._context_id:
                self._reply_error(
                    cookie, command, p.NBD_EINVAL, "no metadata context was negotiated"
                )
                return
            if length == 0 or end > self._size:
                self._reply_error(cookie, command, p.NBD_EINVAL, "bad block status range")
                return
            coro = export.block_status(offset, length)
        elif command == p.CMD_CACHE:
            if not self._can_cache:
                self._reply_error(cookie, command, p.NBD_EINVAL, "cache was not offered")
                return
            if end > self._size:
                self._reply_error(cookie, command, p.NBD_EINVAL, "cache beyond the end")
                return
            coro = export.cache(offset, length)
        else:
            self._reply_error(cookie, command, p.NBD_EINVAL, f"unknown command {command}")
            return
        self._start(coro, cookie, command, offset, length, flags)

    def _start(
        self, coro: Any, cookie: int, command: int, offset: int, length: int, flags: int
    ) -> None:
        """Run an export call inline; answer it now if it completes, else later."""
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            self._complete(cookie, command, offset, length, flags, stop.value)
            return
        except Exception as exc:
            self._reply_exception(cookie, command, exc)
            return
        self._suspend(Suspended(coro, yielded), cookie, command, offset, length, flags)

    # --- transmission: requests that suspend ----------------------------------------------

    def _suspend(
        self,
        suspended: Suspended,
        cookie: int,
        command: int,
        offset: int,
        length: int,
        flags: int,
    ) -> None:
        task = self._loop.create_task(
            self._finish_later(suspended, cookie, command, offset, length, flags)
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if command in _DATA_COMMANDS:
            self._suspended_bytes += length
        if len(self._tasks) >= _MAX_SUSPENDED or self._suspended_bytes >= _MAX_SUSPENDED_BYTES:
            self._set_pause(_PAUSE_BACKLOG, True)

    async def _finish_later(
        self,
        suspended: Suspended,
        cookie: int,
        command: int,
        offset: int,
        length: int,
        flags: int,
    ) -> None:
        try:
            result = await suspended.resume()
        except Exception as exc:
            self._reply_exception(cookie, command, exc)
        else:
            self._complete(cookie, command, offset, length, flags, result)
        finally:
            if command in _DATA_COMMANDS:
                self._suspended_bytes -= length
        self._schedule_send()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:  # a bug in reply handling: the export's errors are answered
            self._ctx.log.error("NBD request for %s failed", self.peer, exc_info=error)
        if (
            len(self._tasks) < _MAX_SUSPENDED // 2
            and self._suspended_bytes < _MAX_SUSPENDED_BYTES // 2
        ):
            self._set_pause(_PAUSE_BACKLOG, False)
        if not self._tasks:
            if self._pause & _PAUSE_STOPPED:
                self._close_when_idle()
            elif self._eof:
                self._loop.call_soon(self._finish_after_eof)
            self._maybe_finished()

    # --- transmission: replies ------------------------------------------------------------

    def _complete(
        self, cookie: int, command: int, offset: int, length: int, flags: int, result: Any
    ) -> None:
        if command == p.CMD_READ:
            size = result.nbytes if isinstance(result, memoryview) else len(result)
            if size != length:
                self._ctx.log.error(
                    "export %r returned %d bytes for a %d-byte read",
                    self._export_name,
                    size,
                    length,
                )
                self._reply_error(cookie, command, p.NBD_EIO, "short read")
                return
            if isinstance(result, memoryview) and result.format != "B":
                result = result.cast("B")
            self._reply_read(cookie, offset, result)
        elif command == p.CMD_BLOCK_STATUS:
            self._reply_block_status(cookie, length, flags, result)
        else:
            self._reply_ok(cookie)

    def _queue(self, data: bytes | bytearray | memoryview, size: int) -> None:
        if self._lost:
            return
        self._out.append(data)
        self._out_bytes += size

    def _reply_ok(self, cookie: int) -> None:
        self._queue(_pack_simple(p.SIMPLE_REPLY_MAGIC, 0, cookie), 16)

    def _reply_read(self, cookie: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        self._bytes_read += size
        if not self._structured:
            self._queue(_pack_simple(_SIMPLE_REPLY_MAGIC, 0, cookie), 16)
        elif size:
            self._queue(replies.offset_data_header(cookie, offset, size), 28)
        else:
            self._queue(replies.none_chunk(cookie), 20)
        if size:
            self._queue(data, size)

    def _reply_block_status(
        self, cookie: int, length: int, flags: int, extents: list[tuple[int, int]]
    ) -> None:
        req_one = bool(flags & p.CMD_FLAG_REQ_ONE)
        descriptors = replies.block_status_descriptors(length, extents, req_one=req_one)
        chunk = replies.block_status_chunk(cookie, self._context_id, descriptors)
        self._queue(chunk, len(chunk))

    def _reply_error(self, cookie: int, command: int, error: int, message: str) -> None:
        self._ctx.metrics.request_error(command, error)
        if self._structured:
            chunk = replies.error_chunk(cookie, error, message)
            self._queue(chunk, len(chunk))
        else:
            self._queue(_pack_simple(_SIMPLE_REPLY_MAGIC, error, cookie), 16)

    def _reply_exception(self, cookie: int, command: int, exc: Exception) -> None:
        name = p.COMMAND_NAMES[command] if command < len(p.COMMAND_NAMES) else "?"
        if isinstance(exc, ExportError):
            error = nbd_error_for(exc.errno)
            message = exc.message or errno.errorcode.get(exc.errno, "")
            self._ctx.log.warning(
                "export %r: %s failed: %s", self._export_name, name, message or exc
            )
        elif isinstance(exc, OSError):
            # The client gets the errno text, not our paths; the log gets everything.
            error = nbd_error_for(exc.errno)
            message = os.strerror(exc.errno) if exc.errno else "I/O error"
            self._ctx.log.warning("export %r: %s failed: %s", self._export_name, name, exc)
        else:
            error = p.NBD_EIO
            message = "internal server error"
            self._ctx.log.error(
                "export %r: %s raised an unexpected error", self._export_name, name, exc_info=True
            )
        self._reply_error(cookie, command, error, message)

    def _schedule_send(self) -> None:
        if not self._in_batch and not self._send_scheduled and self._out:
            self._send_scheduled = True
            self._loop.call_soon(self._send)

    def _send(self) -> None:
        self._send_scheduled = False
        out = self._out
        if not out:
            return
        self._out = []
        self._out_bytes = 0
        transport = self._transport
        if transport is None or self._lost:
            return
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
        if self._metrics_timer is None:
            self._metrics_timer = self._loop.call_later(_METRICS_INTERVAL, self._flush_metrics)

    def _flush_metrics(self) -> None:
        if self._metrics_timer is not None:
            self._metrics_timer.cancel()
            self._metrics_timer = None
        metrics = self._ctx.metrics
        counts = self._request_counts
        if any(counts):
            metrics.add_requests(counts[: len(p.COMMAND_NAMES)])
            if counts[_UNKNOWN_COMMAND]:
                metrics.requests_unknown.inc(counts[_UNKNOWN_COMMAND])
            self._request_counts = [0] * len(counts)
        if self._bytes_read:
            metrics.read_bytes.inc(self._bytes_read)
            self._bytes_read = 0
        if self._bytes_written:
            metrics.written_bytes.inc(self._bytes_written)
            self._bytes_written = 0
