"""The transceiver service: its FastAPI app around the :class:`Transceiver` worker."""

from __future__ import annotations

from fastapi import FastAPI

from datapath.service import service_app

from .settings import TransceiverSettings
from .worker import Transceiver


def create_app(settings: TransceiverSettings) -> FastAPI:
    return service_app("Datamover transceiver", Transceiver(settings))
