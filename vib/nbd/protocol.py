"""NBD wire constants and message layouts, named as in the protocol specification
(NetworkBlockDevice/nbd doc/proto.md). Everything on the wire is big-endian."""

from __future__ import annotations

import struct
from typing import Final

# --- magics -------------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- handshake flags (server) and client flags ----------------------------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
KNOWN_CLIENT_FLAGS: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags -------------------------------------------------------------------
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- options ------------------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

# --- option replies -----------------------------------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
_REP_ERR: Final = 1 << 31
REP_ERR_UNSUP: Final = _REP_ERR + 1
REP_ERR_POLICY: Final = _REP_ERR + 2
REP_ERR_INVALID: Final = _REP_ERR + 3
REP_ERR_PLATFORM: Final = _REP_ERR + 4
REP_ERR_TLS_REQD: Final = _REP_ERR + 5
REP_ERR_UNKNOWN: Final = _REP_ERR + 6
REP_ERR_SHUTDOWN: Final = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD: Final = _REP_ERR + 8
REP_ERR_TOO_BIG: Final = _REP_ERR + 9

# --- NBD_REP_INFO types -------------------------------------------------------------------
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# --- commands -----------------------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
COMMAND_NAMES: Final = (
    "read",
    "write",
    "disc",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
)

# --- command flags ------------------------------------------------------------------------
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# --- structured replies -------------------------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2

# --- base:allocation ----------------------------------------------------------------------
BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# --- error values -------------------------------------------------------------------------
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

# --- limits from the specification ---------------------------------------------------------
MAX_STRING: Final = 4096  # export names, error messages
DEFAULT_MIN_BLOCK: Final = 1
DEFAULT_PREFERRED_BLOCK: Final = 4096
DEFAULT_MAX_PAYLOAD: Final = 32 * 1024 * 1024  # 2^25: never to be treated as an attack
MAX_BLOCK_STATUS_DESCRIPTORS: Final = 1 << 20

# --- message layouts ----------------------------------------------------------------------
SERVER_GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT_PAYLOAD: Final = struct.Struct(">HQH")
INFO_BLOCK_SIZE_PAYLOAD: Final = struct.Struct(">HIII")
REQUEST_HEADER: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER: Final = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OFFSET_DATA_HEADER: Final = struct.Struct(">IHHQIQ")  # chunk header + data offset
ERROR_CHUNK_HEADER: Final = struct.Struct(">IHHQIIH")  # chunk header + error + msg length
BLOCK_STATUS_HEADER: Final = struct.Struct(">IHHQII")  # chunk header + context id
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
