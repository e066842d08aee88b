"""The protection plan: which VMs are protected, their disks, and the two sites.

Until the control service exists, an operator writes this as a YAML or TOML file and
every service reads it. Its shape is the desired state the control service will later
publish on its compacted control topic, so the file can be replaced without touching
the services.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from datapath.config_errors import describe
from datapath.kafka.settings import KafkaClusterSettings

VM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,119}$")


class ProtectionPlanError(ValueError):
    """The plan file is missing, unreadable or invalid; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Site(_Strict):
    """One site: its Kafka cluster."""

    kafka: KafkaClusterSettings


class Sites(_Strict):
    source: Site
    target: Site


class Disk(_Strict):
    """A protected disk. Its index in the VM's list is its number in the journal."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    source: str = Field(description="source storage: file path, block device or NBD URI")
    target: str = Field(description="target storage: file path, block device or NBD URI")
    size: int | None = Field(
        default=None, gt=0, description="bytes; required when the source does not exist yet"
    )


class Journal(_Strict):
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, gt=0)
    replication_factor: int = Field(default=1, ge=1)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024 * 1024)


class ProtectedVM(_Strict):
    id: str
    disks: list[Disk] = Field(min_length=1, max_length=65535)
    journal: Journal = Journal()
    rpo_objective_s: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not VM_ID_PATTERN.match(self.id):
            raise ValueError(
                f"VM id {self.id!r} must be 1-120 characters of letters, digits, '_' and '-'"
                " (Kafka topic names treat '.' and '_' alike)"
            )
        names = [d.name for d in self.disks]
        if len(set(names)) != len(names):
            raise ValueError(f"VM {self.id}: disk names must be unique, got {names}")
        return self

    def disk_index(self, name: str) -> int:
        for index, disk in enumerate(self.disks):
            if disk.name == name:
                return index
        raise KeyError(f"VM {self.id} has no disk named {name!r}")


class ProtectionPlan(_Strict):
    sites: Sites
    vms: list[ProtectedVM] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_vms(self) -> Self:
        ids = [vm.id for vm in self.vms]
        if len(set(ids)) != len(ids):
            raise ValueError(f"VM ids must be unique, got {ids}")
        return self

    def vm(self, vm_id: str) -> ProtectedVM:
        for vm in self.vms:
            if vm.id == vm_id:
                return vm
        raise KeyError(f"no protected VM {vm_id!r}")


def load_protection_plan(path: str | Path) -> ProtectionPlan:
    """Reads a plan from YAML (.yaml/.yml) or TOML (.toml)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProtectionPlanError(f"cannot read protection plan {path}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ProtectionPlanError(f"protection plan {path} is not valid: {exc}") from exc
    try:
        return ProtectionPlan.model_validate(raw or {})
    except ValidationError as exc:
        # Not str(exc): it repeats the values, and a cluster block holds passwords.
        raise ProtectionPlanError(f"protection plan {path} is invalid:\n{describe(exc)}") from None


def dump_protection_plan(plan: ProtectionPlan, path: str | Path) -> None:
    """Writes the plan for the services to read: with its secrets, so readable by its
    owner only."""
    text = yaml.safe_dump(dump_with_secrets(plan, exclude_none=True), sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        f.write(text)


def dump_with_secrets(model: BaseModel, **options: Any) -> dict[str, Any]:
    """`model.model_dump(mode="json", **options)` with every SecretStr in the clear, for
    what only the services read (a plan file, a producer child's settings): model_dump
    masks them."""
    data = model.model_dump(mode="json", **options)
    _reveal_secrets(model, data)
    return data


def _reveal_secrets(model: BaseModel, data: dict[str, Any]) -> None:
    """SASL and TLS key passwords alike, wherever they are."""
    for name, value in model:
        if name not in data:
            continue
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
        elif isinstance(value, BaseModel):
            _reveal_secrets(value, data[name])
        elif isinstance(value, list):
            for item, dumped in zip(value, data[name], strict=True):
                if isinstance(item, BaseModel):
                    _reveal_secrets(item, dumped)
