"""A service's settings come from its DM_* environment unless an option is given, a bad
one is named, with its variable, without its value, and each command's help shows the
defaults its settings have."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from datapath.service import load_settings
from dmover.cli import app
from services.applier.settings import ApplierSettings
from services.receiver.settings import ReceiverSettings
from services.transceiver.settings import TransceiverSettings
from vib.settings import TapSettings


@pytest.mark.parametrize(
    ("cls", "prefix", "port_field"),
    [
        (ReceiverSettings, "DM_RECEIVER_", "http_port"),
        (TransceiverSettings, "DM_TRANSCEIVER_", "http_port"),
        (ApplierSettings, "DM_APPLIER_", "port"),
        (TapSettings, "DM_TAP_", "http_port"),
    ],
)
def test_the_environment_holds_unless_an_option_is_given(
    cls: type[ReceiverSettings | TransceiverSettings | ApplierSettings | TapSettings],
    prefix: str,
    port_field: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv(f"{prefix}PLAN", str(tmp_path / "plan.yaml"))
    monkeypatch.setenv(f"{prefix}{port_field.upper()}", "9999")
    # An option not given (None) leaves the environment's value.
    settings = load_settings(cls, plan=None, **{port_field: None})
    assert getattr(settings, port_field) == 9999
    assert settings.plan == tmp_path / "plan.yaml"
    assert getattr(load_settings(cls, **{port_field: 8000}), port_field) == 8000


def test_a_bad_setting_is_named_with_its_variable_and_without_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__BOOTSTRAP_SERVERS", "x:1")
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__SASL_USERNAME", "u")
    monkeypatch.setenv("DM_TRANSCEIVER_TARGET_KAFKA__SASL_PASSWORD", "hunter2-s3cret")
    monkeypatch.setenv("DM_TRANSCEIVER_HTTP_PORT", "not-a-port")
    with pytest.raises(typer.Exit) as caught:
        load_settings(TransceiverSettings, plan="plan.yaml")
    assert caught.value.exit_code == 2
    err = capsys.readouterr().err
    assert "http_port (DM_TRANSCEIVER_HTTP_PORT)" in err
    assert "target_kafka (DM_TRANSCEIVER_TARGET_KAFKA)" in err
    assert "hunter2" not in err and "not-a-port" not in err


@pytest.mark.parametrize(
    ("command", "cls", "port_field"),
    [
        ("tap", TapSettings, "http_port"),
        ("receiver", ReceiverSettings, "http_port"),
        ("transceiver", TransceiverSettings, "http_port"),
        ("applier", ApplierSettings, "port"),
    ],
)
def test_each_command_names_its_plan_variable_and_the_defaults_of_its_settings(
    command: str,
    cls: type[ReceiverSettings | TransceiverSettings | ApplierSettings | TapSettings],
    port_field: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if "│ --" in line}
    assert f"[{cls.model_config['env_prefix']}PLAN]" in lines["--plan"]
    assert f"[default: ({cls.model_fields[port_field].default})]" in lines["--port"]
    assert "[default: (127.0.0.1)]" in lines["--host"]
