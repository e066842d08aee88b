"""Serve disks over NBD from the command line, for trying the server and for measuring it:

    python -m vib.nbd.serve disk.img [more.img ...] [--port 10809] [--unix PATH]

Each disk (a file, block device or NBD URI, see datapath.storage.open_backend) is
exported under its file name without extension; the first one is also the default
export. Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from datapath.storage import open_backend
from vib.nbd.server import NbdServer
from vib.nbd.storage_export import StorageExport

logger = logging.getLogger("vib.nbd.serve")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vib.nbd.serve", description=__doc__)
    parser.add_argument("disks", nargs="+", help="disk files, block devices or NBD URIs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10809, help="TCP port (0: any free one)")
    parser.add_argument("--unix", help="also listen on this Unix socket")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stock event loop")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    exports: dict[str, StorageExport] = {}
    backends = []
    for spec in args.disks:
        backend = open_backend(spec, readonly=args.read_only)
        backends.append(backend)
        name = Path(spec).stem or f"disk{len(exports)}"
        exports[name] = StorageExport(name, backend, description=spec, read_only=args.read_only)
    server = NbdServer(exports, default_export=next(iter(exports)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        port = await server.serve_tcp(args.host, args.port)
        if args.unix:
            await server.serve_unix(args.unix)
        logger.info("exports %s on nbd://%s:%d/", ", ".join(exports), args.host, port)
        await stop.wait()
    finally:
        await server.close()
        for backend in backends:
            backend.close()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.no_uvloop:
        asyncio.run(_serve(args))
        return
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
