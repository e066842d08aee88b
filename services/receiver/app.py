"""The receiver service: its FastAPI app around the :class:`Receiver` worker."""

from __future__ import annotations

from fastapi import FastAPI

from datapath.service import service_app

from .settings import ReceiverSettings
from .worker import Receiver


def create_app(settings: ReceiverSettings) -> FastAPI:
    return service_app("Datamover receiver", Receiver(settings))
