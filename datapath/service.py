"""The skeleton every data-path service shares: a FastAPI app around a worker loop.

Each service writes `create_app(settings)`, which builds its worker and hands it to
`service_app`. The app's lifespan starts the worker and stops it, so nothing runs at
import and start/stop are symmetric. Routes: `/health` (the process answers),
`/ready` (the worker says it is doing its job), `/metrics` (Prometheus text format
from the worker's own registry) and `/status` (the worker's own JSON).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import typer
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from datapath.config_errors import describe
from datapath.malloc_tuning import tune_malloc

log = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class Worker(Protocol):
    """The long-running part of a service."""

    registry: CollectorRegistry

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...


def service_app(title: str, worker: Worker) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A client never sees a traceback; the log keeps it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the service log"}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        is_ready = worker.ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(worker.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return worker.status()

    return app


def configure_logging(level: str) -> None:
    """One log format for every service process; ``level`` as DEBUG/INFO/... in any case."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


async def wait_ended(tasks: Sequence[asyncio.Task[Any]], owner: str) -> None:
    """Waits for every task to end, whatever each ends with, logging the failures (not
    the cancellations): a stop goes on to close what the tasks used."""
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for task, outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, Exception):
            log.error("%s: %s ended with %r", owner, task.get_name(), outcome)


# The options every `dmover <service>` command shares, their help taken from the
# service's settings class (its variables' prefix, its defaults).


def _env_prefix(cls: type[BaseSettings]) -> str:
    return cls.model_config.get("env_prefix") or ""


def plan_option(cls: type[BaseSettings]) -> Any:
    return typer.Option(
        "--plan", help=f"protection plan file (YAML or TOML) [{_env_prefix(cls)}PLAN]"
    )


def host_option(cls: type[BaseSettings], field: str = "http_host") -> Any:
    return typer.Option(
        "--host",
        help="HTTP address for /health /ready /metrics",
        show_default=str(cls.model_fields[field].default),
    )


def port_option(cls: type[BaseSettings], field: str = "http_port") -> Any:
    return typer.Option(
        "--port", help="HTTP port", show_default=str(cls.model_fields[field].default)
    )


def log_level_option() -> Any:
    return typer.Option(help="DEBUG, INFO, WARNING, ERROR")


def serve(
    create_app: Callable[[SettingsT], FastAPI],
    settings_cls: type[SettingsT],
    log_level: str,
    *,
    host_field: str = "http_host",
    port_field: str = "http_port",
    **options: Any,
) -> None:
    """What every `dmover <service>` command does: its logging, its settings (the options
    given over the environment, see `load_settings`), logged with secrets masked, then its
    app served on the settings' HTTP address."""
    configure_logging(log_level)
    settings = load_settings(settings_cls, **options)
    log.info("%s: %s", settings_cls.__name__, settings.model_dump_json())
    host, port = getattr(settings, host_field), getattr(settings, port_field)
    run_app(create_app(settings), host, port, log_level=log_level.lower())


def load_settings(cls: type[SettingsT], **options: Any) -> SettingsT:
    """A service's settings: its ``DM_*`` environment, overridden by the command-line
    options given (None: not given). Invalid or missing ones end the command with one
    line per problem, naming the setting and its variable, never its value."""
    # An option left unset is dropped, not passed as None: the setting keeps its own
    # source (its variable or its default).
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        detail = describe(
            exc,
            env_prefix=_env_prefix(cls),
            nested_delimiter=cls.model_config.get("env_nested_delimiter") or "__",
        )
        typer.echo(f"invalid settings:\n{detail}", err=True)
        raise typer.Exit(2) from None


def run_app(app: FastAPI, host: str, port: int, *, log_level: str = "info") -> None:
    """Serves an app until SIGINT/SIGTERM (used by the `dmover <service>` commands).

    Every service moves megabytes per batch: its large buffers come from a heap that
    keeps freed memory (see datapath.malloc_tuning)."""
    tune_malloc()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        loop="uvloop",
        http="httptools",
        # Health checks, metric scrapes and status polls would fill the log at INFO, and
        # formatting each line costs the event loop that also moves the data.
        access_log=log_level.lower() == "debug",
    )
    uvicorn.Server(config).run()
