"""The tap service: `create_app(settings)` builds the FastAPI app around a `TapWorker`.

Routes: the shared /health /ready /metrics /status, and POST /vms/{vm_id}/full-sync to
resend every allocated block of a VM in one resync bracket.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from datapath.service import service_app
from vib.settings import TapSettings
from vib.tap_worker import TapWorker


def create_app(settings: TapSettings) -> FastAPI:
    worker = TapWorker(settings)
    app = service_app("Datamover tap", worker)

    @app.post("/vms/{vm_id}/full-sync", status_code=202)
    async def full_sync(vm_id: str) -> JSONResponse:
        if vm_id not in worker.taps:
            raise HTTPException(status_code=404, detail=f"VM {vm_id!r} is not protected here")
        await worker.full_sync(vm_id)
        return JSONResponse({"vm": vm_id, "full_sync": "started"}, status_code=202)

    return app
