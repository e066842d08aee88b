"""The fixed newstyle handshake: option haggling up to the choice of an export.

Handshakes are rare and short, so this is plain sequential code over an async byte
channel; the per-request fast path lives in connection.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vib.nbd import protocol as p
from vib.nbd.catalog import ExportCatalog
from vib.nbd.errors import ProtocolViolation, ServerShuttingDown
from vib.nbd.export import Export

# Option payloads we accept. The largest legitimate one is a meta context request
# naming a 4 KiB export and a few queries; anything much larger is hostile.
MAX_OPTION_DATA = 64 * 1024

# The one metadata context we offer. IDs are opaque to clients; any nonzero value works.
ALLOCATION_CONTEXT_ID = 1

_OPTION_NAMES = {
    p.OPT_EXPORT_NAME: "EXPORT_NAME",
    p.OPT_ABORT: "ABORT",
    p.OPT_LIST: "LIST",
    p.OPT_STARTTLS: "STARTTLS",
    p.OPT_INFO: "INFO",
    p.OPT_GO: "GO",
    p.OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    p.OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    p.OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
}


class HandshakeChannel(Protocol):
    async def read_exact(self, length: int) -> bytes: ...

    def send(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Session:
    """What the handshake agreed on, for the transmission phase."""

    export_name: str
    export: Export
    transmission_flags: int
    structured_replies: bool
    # Context ID for base:allocation when the client selected it for this export.
    allocation_context: int | None


@dataclass(frozen=True, slots=True)
class BlockSizes:
    minimum: int = p.DEFAULT_MIN_BLOCK
    preferred: int = p.DEFAULT_PREFERRED_BLOCK
    maximum_payload: int = p.DEFAULT_MAX_PAYLOAD


class _OptionError(Exception):
    """Answer the current option with an error reply and keep negotiating."""

    def __init__(self, reply_type: int, message: str) -> None:
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message


def option_name(option: int) -> str:
    return _OPTION_NAMES.get(option, f"option {option}")


def transmission_flags(export: Export, *, structured_replies: bool) -> int:
    flags = p.FLAG_HAS_FLAGS
    if export.read_only:
        flags |= p.FLAG_READ_ONLY
    else:
        if export.can_trim:
            flags |= p.FLAG_SEND_TRIM
        if export.can_zero:
            flags |= p.FLAG_SEND_WRITE_ZEROES
    if export.can_flush:
        flags |= p.FLAG_SEND_FLUSH
    if export.can_fua:
        flags |= p.FLAG_SEND_FUA
    if export.can_multi_conn:
        flags |= p.FLAG_CAN_MULTI_CONN
    if export.can_cache:
        flags |= p.FLAG_SEND_CACHE
    if structured_replies:
        # Every read is answered with a single data chunk, so "don't fragment" is free.
        flags |= p.FLAG_SEND_DF
    return flags


def _encode_string(text: str) -> bytes:
    """UTF-8, cut to the spec's 4096-byte limit on a character boundary."""
    return text.encode()[: p.MAX_STRING].decode("utf-8", "ignore").encode()


def _decode_string(raw: bytes, what: str) -> str:
    if len(raw) > p.MAX_STRING:
        raise _OptionError(p.REP_ERR_INVALID, f"{what} is longer than {p.MAX_STRING} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _OptionError(p.REP_ERR_INVALID, f"{what} is not valid UTF-8") from None
    if "\0" in text:
        raise _OptionError(p.REP_ERR_INVALID, f"{what} contains NUL")
    return text


def _parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """Export name and queries of LIST_META_CONTEXT / SET_META_CONTEXT."""
    invalid = _OptionError(p.REP_ERR_INVALID, "malformed meta context request")
    if len(data) < 8:
        raise invalid
    (name_length,) = p.U32.unpack_from(data, 0)
    pos = 4 + name_length
    if pos + 4 > len(data):
        raise invalid
    name = _decode_string(data[4:pos], "export name")
    (count,) = p.U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise invalid
        (query_length,) = p.U32.unpack_from(data, pos)
        pos += 4
        if pos + query_length > len(data):
            raise invalid
        queries.append(_decode_string(data[pos : pos + query_length], "query"))
        pos += query_length
    if pos != len(data):
        raise invalid
    return name, queries


class Negotiation:
    """One client's option haggling. `run()` returns the agreed Session, or None when
    the client ended the session (NBD_OPT_ABORT)."""

    def __init__(
        self,
        channel: HandshakeChannel,
        catalog: ExportCatalog,
        *,
        block_sizes: BlockSizes,
        shutting_down: Callable[[], bool],
    ) -> None:
        self._channel = channel
        self._catalog = catalog
        self._block_sizes = block_sizes
        self._shutting_down = shutting_down
        self._no_zeroes = False
        self._structured = False
        # Export (canonical name) the last SET_META_CONTEXT selected base:allocation for.
        self._allocation_export: str | None = None
        self._finished = False

    async def run(self) -> Session | None:
        channel = self._channel
        channel.send(
            p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
        )
        (client_flags,) = p.CLIENT_FLAGS.unpack(await channel.read_exact(4))
        if client_flags & ~p.KNOWN_CLIENT_FLAGS:
            raise ProtocolViolation("client_flags", f"unknown client flags {client_flags:#x}")
        self._no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        # Clients that do not set C_FIXED_NEWSTYLE are served as if they had: the spec
        # allows it, and an error reply is still better than a dropped connection.
        while not self._finished:
            magic, option, length = p.OPTION_HEADER.unpack(await channel.read_exact(16))
            if magic != p.IHAVEOPT:
                raise ProtocolViolation("option_magic", f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise ProtocolViolation(
                    "option_length", f"{option_name(option)} with {length} bytes of data"
                )
            data = await channel.read_exact(length) if length else b""
            try:
                session = await self._handle(option, data)
            except _OptionError as err:
                self._reply(option, err.reply_type, err.message.encode())
                session = None
            if session is not None:
                return session
            await channel.drain()
        return None

    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._channel.send(
            p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data
        )

    async def _handle(self, option: int, data: bytes) -> Session | None:
        if option == p.OPT_ABORT:
            # Any data is ignored, as the spec asks.
            self._reply(option, p.REP_ACK)
            self._finished = True
            return None
        if self._shutting_down():
            if option == p.OPT_EXPORT_NAME:
                raise ServerShuttingDown()  # EXPORT_NAME has no error reply
            raise _OptionError(p.REP_ERR_SHUTDOWN, "the server is shutting down")
        if option == p.OPT_EXPORT_NAME:
            return await self._export_name(data)
        if option in (p.OPT_INFO, p.OPT_GO):
            return await self._info_or_go(option, data)
        if option == p.OPT_LIST:
            await self._list(data)
        elif option == p.OPT_STRUCTURED_REPLY:
            if data:
                raise _OptionError(p.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            self._structured = True
            self._reply(option, p.REP_ACK)
        elif option == p.OPT_LIST_META_CONTEXT:
            await self._list_meta_context(data)
        elif option == p.OPT_SET_META_CONTEXT:
            await self._set_meta_context(data)
        elif option == p.OPT_STARTTLS:
            if data:
                raise _OptionError(p.REP_ERR_INVALID, "STARTTLS takes no data")
            raise _OptionError(p.REP_ERR_POLICY, "TLS is not offered by this server")
        else:
            raise _OptionError(p.REP_ERR_UNSUP, f"{option_name(option)} is not supported")
        return None

    async def _export_name(self, data: bytes) -> Session:
        # EXPORT_NAME has no error reply: anything wrong ends the session.
        try:
            name = _decode_string(data, "export name")
        except _OptionError as err:
            raise ProtocolViolation("export_name", err.message) from None
        found = await self._catalog.lookup(name)
        if found is None:
            raise ProtocolViolation("unknown_export", f"EXPORT_NAME for unknown export {name!r}")
        canonical, export = found
        session = self._session(canonical, export)
        reply = p.EXPORT_NAME_REPLY.pack(export.size, session.transmission_flags)
        self._channel.send(reply if self._no_zeroes else reply + bytes(124))
        return session

    def _session(self, canonical: str, export: Export) -> Session:
        context = (
            ALLOCATION_CONTEXT_ID
            if self._structured and self._allocation_export == canonical
            else None
        )
        return Session(
            export_name=canonical,
            export=export,
            transmission_flags=transmission_flags(export, structured_replies=self._structured),
            structured_replies=self._structured,
            allocation_context=context,
        )

    async def _info_or_go(self, option: int, data: bytes) -> Session | None:
        if len(data) < 6:
            raise _OptionError(p.REP_ERR_INVALID, "INFO/GO request too short")
        (name_length,) = p.U32.unpack_from(data, 0)
        if name_length > len(data) - 6:
            raise _OptionError(p.REP_ERR_INVALID, "export name runs past the option data")
        name = _decode_string(data[4 : 4 + name_length], "export name")
        (count,) = p.U16.unpack_from(data, 4 + name_length)
        if len(data) != 6 + name_length + 2 * count:
            raise _OptionError(p.REP_ERR_INVALID, "information request list has the wrong size")
        requested = set(struct.unpack_from(f">{count}H", data, 6 + name_length))
        found = await self._catalog.lookup(name)
        if found is None:
            raise _OptionError(p.REP_ERR_UNKNOWN, f"no export named {name!r}")
        canonical, export = found
        session = self._session(canonical, export)
        self._reply(
            option,
            p.REP_INFO,
            p.INFO_EXPORT_PAYLOAD.pack(p.INFO_EXPORT, export.size, session.transmission_flags),
        )
        if p.INFO_NAME in requested:
            self._reply(option, p.REP_INFO, p.U16.pack(p.INFO_NAME) + _encode_string(canonical))
        if p.INFO_DESCRIPTION in requested and export.description:
            description = _encode_string(export.description)
            self._reply(option, p.REP_INFO, p.U16.pack(p.INFO_DESCRIPTION) + description)
        # Sent even when not asked for: harmless, and it tells careful clients our limit.
        sizes = self._block_sizes
        self._reply(
            option,
            p.REP_INFO,
            p.INFO_BLOCK_SIZE_PAYLOAD.pack(
                p.INFO_BLOCK_SIZE, sizes.minimum, sizes.preferred, sizes.maximum_payload
            ),
        )
        self._reply(option, p.REP_ACK)
        return session if option == p.OPT_GO else None

    async def _list(self, data: bytes) -> None:
        if data:
            raise _OptionError(p.REP_ERR_INVALID, "LIST takes no data")
        if not self._catalog.can_list:
            raise _OptionError(p.REP_ERR_POLICY, "this server does not list its exports")
        for name in self._catalog.names():
            found = await self._catalog.lookup(name)
            if found is None:
                continue  # removed since names() was taken
            encoded = name.encode()
            details = _encode_string(found[1].description)
            self._reply(p.OPT_LIST, p.REP_SERVER, p.U32.pack(len(encoded)) + encoded + details)
        self._reply(p.OPT_LIST, p.REP_ACK)

    async def _meta_context_export(self, data: bytes) -> tuple[str, Export, list[str]]:
        name, queries = _parse_meta_context_request(data)
        for query in queries:
            if ":" not in query:
                raise _OptionError(p.REP_ERR_INVALID, f"query {query!r} has no namespace")
        found = await self._catalog.lookup(name)
        if found is None:
            raise _OptionError(p.REP_ERR_UNKNOWN, f"no export named {name!r}")
        return found[0], found[1], queries

    async def _list_meta_context(self, data: bytes) -> None:
        if not self._structured:
            raise _OptionError(p.REP_ERR_INVALID, "negotiate structured replies first")
        _, export, queries = await self._meta_context_export(data)
        # An empty query list, "base:" and "base:allocation" all name our one context;
        # other namespaces and unknown base: leaves are ignored, as the spec requires.
        offered = export.supports_block_status and (
            not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        )
        if offered:
            self._reply(
                p.OPT_LIST_META_CONTEXT,
                p.REP_META_CONTEXT,
                p.U32.pack(0) + p.BASE_ALLOCATION.encode(),
            )
        self._reply(p.OPT_LIST_META_CONTEXT, p.REP_ACK)

    async def _set_meta_context(self, data: bytes) -> None:
        # A SET replaces the previous selection even when it fails.
        self._allocation_export = None
        if not self._structured:
            raise _OptionError(p.REP_ERR_INVALID, "negotiate structured replies first")
        canonical, export, queries = await self._meta_context_export(data)
        if export.supports_block_status and p.BASE_ALLOCATION in queries:
            self._allocation_export = canonical
            self._reply(
                p.OPT_SET_META_CONTEXT,
                p.REP_META_CONTEXT,
                p.U32.pack(ALLOCATION_CONTEXT_ID) + p.BASE_ALLOCATION.encode(),
            )
        self._reply(p.OPT_SET_META_CONTEXT, p.REP_ACK)
