"""docker-compose.yml runs only commands that exist in the `dmover` CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from dmover.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _resolve(argv: list[str]) -> tuple[Any, list[str]]:
    command: Any = typer.main.get_command(app)
    rest = argv
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"`dmover {' '.join(argv)}`: no command {rest[0]!r}"
        command, rest = sub, rest[1:]
    return command, rest


def test_compose_runs_only_existing_cli_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands = {
        name: service["command"]
        for name, service in compose["services"].items()
        if "command" in service
    }
    assert {"tap", "receiver", "transceiver", "applier"} <= commands.keys()
    for name, argv in commands.items():
        assert argv[0] == "dmover", f"service {name} runs {argv[0]}, not dmover"
        command, rest = _resolve(argv[1:])
        known = {opt for param in command.params for opt in param.opts}
        for word in rest:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"service {name}: `{word}` is not an option"


def test_compose_services_have_healthchecks() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"service {name} has no healthcheck"
        if service.get("command", [""])[0] == "dmover":
            # /health answers whatever the worker does; /ready says it does its job.
            assert "/ready" in " ".join(service["healthcheck"]["test"]), name


def test_compose_keeps_the_journals_and_the_positions_on_volumes() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for site in ("kafka-source", "kafka-target"):
        log_dirs = services[site]["environment"]["KAFKA_LOG_DIRS"]
        assert any(v.split(":")[1] == log_dirs for v in services[site]["volumes"]), site
    # The services run as uid 1000; the image makes the directories the plan's disks
    # and the state live in, owned by it, so a new volume starts writable.
    plan = yaml.safe_load((ROOT / "deploy" / "compose" / "plan.yaml").read_text())
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "USER 1000" in dockerfile and "chown -R 1000:1000 /var/lib/datamover" in dockerfile
    for disk in plan["vms"][0]["disks"]:
        for path in (disk["source"], disk["target"]):
            assert str(Path(path).parent) in dockerfile, path


def test_compose_plan_is_a_valid_protection_plan() -> None:
    from datapath.protection import load_protection_plan

    plan = load_protection_plan(ROOT / "deploy" / "compose" / "plan.yaml")
    assert plan.vms[0].id == "demo-vm"
