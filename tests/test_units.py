"""The shipped systemd units pass ``systemd-analyze verify`` and agree with the example config.

``systemd-analyze verify`` works without systemd as PID 1: it loads the units offline. It exits 0
even for unknown keys (it only warns on stderr), so the test requires an empty stderr. It also
checks that ``ExecStart=`` names an existing executable; ``/opt/ramd/bin/ramd`` need not exist
here, so the test verifies copies whose ``ExecStart=`` points at a stub executable instead.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from ramd.sizes import parse_size

UNIT_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNITS = ("ramd.service", "ramd.socket", "ramd-qmp.socket")
SHIPPED_EXEC = "ExecStart=/opt/ramd/bin/ramd "


def _settings(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order; keys may repeat."""
    settings: dict[str, list[str]] = {}
    for line in (UNIT_DIR / unit).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    stub = tmp_path / "ramd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text()
        if unit == "ramd.service":
            assert text.count(SHIPPED_EXEC) == 1
            text = text.replace(SHIPPED_EXEC, f"ExecStart={stub} ")
        (tmp_path / unit).write_text(text)

    proc = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit) for unit in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stderr == ""
    assert proc.returncode == 0


def test_sockets_name_their_dialect_and_activate_ramd() -> None:
    for unit, name in (("ramd.socket", "jsonrpc"), ("ramd-qmp.socket", "qmp")):
        settings = _settings(unit)
        assert settings["FileDescriptorName"] == [name]
        assert settings["Service"] == ["ramd.service"]
        assert settings["SocketMode"] == ["0660"]


def test_service_notifies_and_is_watched() -> None:
    settings = _settings("ramd.service")
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"] == ["30"]
    assert settings["RuntimeDirectory"] == ["ramd"]
    # Without it, stopping the service would delete the sockets that systemd still listens on.
    assert settings["RuntimeDirectoryPreserve"] == ["yes"]


def test_example_config_parses_and_matches_the_socket_units() -> None:
    text = (UNIT_DIR / "ramd.toml").read_text()
    config = tomllib.loads(text)
    assert [config["socket"]] == _settings("ramd.socket")["ListenStream"]
    assert f'# qmp-socket = "{_settings("ramd-qmp.socket")["ListenStream"][0]}"' in text
    limits = config["limits"]
    assert parse_size(limits["max-message-size"]) == 8 << 20
    assert parse_size(limits["io-chunk"]) == 4 << 20
    assert limits["max-depth"] == 1024


def test_example_block_parses_when_uncommented() -> None:
    text = (UNIT_DIR / "ramd.toml").read_text()
    block_lines = text[text.index("# [[block]]") :].splitlines()
    uncommented = "\n".join(line.removeprefix("# ") for line in block_lines)
    (block,) = tomllib.loads(uncommented)["block"]
    assert block["id"] == "ram0"
    assert parse_size(block["size"]) == 64 << 20
    assert parse_size(block["max-size"]) == 1 << 30


def test_example_config_states_the_embedded_defaults() -> None:
    from ramd.config import Config, parse_config

    with open(UNIT_DIR / "ramd.toml", "rb") as f:
        example = parse_config(tomllib.load(f))
    assert example.model_dump(exclude={"socket"}) == Config().model_dump(exclude={"socket"})
