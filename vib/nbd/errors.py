"""Why a session ended early. Neither is a server fault: both are logged briefly and the
connection is dropped while every other session carries on."""

from __future__ import annotations


class ProtocolViolation(Exception):
    """The client broke a mandatory rule; the server hangs up (a 'hard disconnect')."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class PeerGone(Exception):
    """The client closed or reset the connection in the middle of a message."""


class ServerShuttingDown(Exception):
    """A session that cannot be answered with an error reply (NBD_OPT_EXPORT_NAME) is
    ended because the server is closing."""
