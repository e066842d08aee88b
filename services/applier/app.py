"""The applier's HTTP API: the service routes plus per-VM status, pause and resume."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException

from datapath.service import service_app
from services.applier.settings import ApplierSettings
from services.applier.vm import PauseTimeout, VmApplier
from services.applier.worker import ApplierWorker


def create_app(settings: ApplierSettings) -> FastAPI:
    worker = ApplierWorker(settings)
    app = service_app("Datamover applier", worker)

    def lookup(vm_id: str) -> VmApplier:
        try:
            return worker.vm(vm_id)
        except KeyError:
            raise HTTPException(404, f"no protected VM {vm_id!r} in this applier") from None

    @app.get("/vms/{vm_id}")
    async def vm_status(vm_id: str) -> dict[str, Any]:
        return lookup(vm_id).status()

    @app.post("/vms/{vm_id}/pause")
    async def pause(vm_id: str) -> dict[str, Any]:
        """Returns once the target disks are consistent, fsynced and no longer change;
        the body gives the applied position (sequence, source time) they hold."""
        applier = lookup(vm_id)
        try:
            await applier.pause()
        except PauseTimeout as exc:
            raise HTTPException(504, str(exc)) from exc
        return applier.status()

    @app.post("/vms/{vm_id}/resume")
    async def resume(vm_id: str) -> dict[str, Any]:
        applier = lookup(vm_id)
        await applier.resume()
        return applier.status()

    return app
