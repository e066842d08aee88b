"""The protection plan: valid plans load from YAML and TOML, bad ones fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from datapath.protection import (
    ProtectionPlanError,
    dump_protection_plan,
    load_protection_plan,
)

PLAN = """
sites:
  source: {kafka: {bootstrap_servers: "127.0.0.1:9092", sasl_password: "s3cret"}}
  target: {kafka: {bootstrap_servers: "127.0.0.1:9093"}}
vms:
  - id: vm-1
    disks:
      - {name: os, source: /a/os.raw, target: /b/os.raw, size: 1048576}
      - {name: data, source: /a/data.raw, target: "nbd://127.0.0.1:10809/data"}
"""


def test_plan_loads_from_yaml_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    plan = load_protection_plan(path)
    vm = plan.vm("vm-1")
    assert [d.name for d in vm.disks] == ["os", "data"]
    assert vm.disk_index("data") == 1
    assert "s3cret" not in repr(plan)
    out = tmp_path / "out.yaml"
    dump_protection_plan(plan, out)
    assert load_protection_plan(out) == plan


def test_plan_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(
        """
[sites.source.kafka]
bootstrap_servers = "127.0.0.1:9092"
[sites.target.kafka]
bootstrap_servers = "127.0.0.1:9093"
[[vms]]
id = "vm-2"
[[vms.disks]]
name = "os"
source = "/a"
target = "/b"
"""
    )
    assert load_protection_plan(path).vms[0].id == "vm-2"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sites: [", "not valid"),
        (PLAN.replace("vm-1", "bad id!"), "VM id"),
        (PLAN.replace("name: data", "name: os"), "unique"),
        (PLAN.replace("size: 1048576", "size: -1"), "size"),
        (PLAN + "  - id: vm-1\n    disks: [{name: x, source: a, target: b}]\n", "unique"),
        ("sites: {source: {kafka: {bootstrap_servers: x}}}", "target"),
    ],
)
def test_invalid_plan_fails_with_a_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ProtectionPlanError, match=needle):
        load_protection_plan(path)


def test_missing_plan_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ProtectionPlanError, match=r"nope\.yaml"):
        load_protection_plan(tmp_path / "nope.yaml")
