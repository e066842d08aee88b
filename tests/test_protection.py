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


def test_every_secret_is_written_for_the_services_and_readable_by_the_owner_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(
        """
sites:
  source:
    kafka:
      bootstrap_servers: "127.0.0.1:9093"
      security_protocol: SASL_SSL
      sasl_mechanism: SCRAM-SHA-512
      sasl_username: dm
      sasl_password: "sasl-s3cret"
      ssl_certfile: /etc/dm/client.pem
      ssl_keyfile: /etc/dm/client.key
      ssl_key_password: "key-s3cret"
  target: {kafka: {bootstrap_servers: "127.0.0.1:9094"}}
vms: []
"""
    )
    plan = load_protection_plan(path)
    out = tmp_path / "out.yaml"
    out.write_text("")
    out.chmod(0o644)
    dump_protection_plan(plan, out)
    assert load_protection_plan(out) == plan
    kafka = plan.sites.source.kafka
    reloaded = load_protection_plan(out).sites.source.kafka
    assert reloaded.ssl_key_password is not None and kafka.ssl_key_password is not None
    assert reloaded.ssl_key_password.get_secret_value() == "key-s3cret"
    assert out.stat().st_mode & 0o777 == 0o600


def test_an_invalid_cluster_block_is_named_without_its_password(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(
        """
sites:
  source:
    kafka: {bootstrap_servers: "x:1", sasl_mechanism: PLAIN, sasl_username: u,
            sasl_password: "hunter2-s3cret"}
  target: {kafka: {bootstrap_servers: "y:1"}}
vms: []
"""
    )
    with pytest.raises(ProtectionPlanError) as caught:
        load_protection_plan(path)
    message = str(caught.value)
    assert "sites.source.kafka" in message and "security_protocol" in message
    assert "hunter2" not in message
