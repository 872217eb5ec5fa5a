"""The shipped systemd units pass ``systemd-analyze verify`` and agree with the example config.

``systemd-analyze verify`` works without systemd as PID 1: it loads the units offline. It exits 0
even for unknown keys (it only warns on stderr), so the test requires an empty stderr. It also
checks that ``ExecStart=`` names an existing executable; ``/opt/ramd/bin/ramd`` need not exist
here, so the test verifies copies whose ``ExecStart=`` points at a stub executable instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from daemon import Daemon, Raw

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
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["TimeoutStopSec"] == ["90"]
    assert settings["RuntimeDirectory"] == ["ramd"]
    # Without it, stopping the service would delete the sockets that systemd still listens on.
    assert settings["RuntimeDirectoryPreserve"] == ["yes"]


def test_service_runs_as_its_own_user_with_only_cap_ipc_lock() -> None:
    settings = _settings("ramd.service")
    assert settings["User"] == ["ramd"]
    assert settings["CapabilityBoundingSet"] == ["CAP_IPC_LOCK"]
    assert settings["AmbientCapabilities"] == ["CAP_IPC_LOCK"]
    assert settings["SystemCallFilter"] == ["@system-service mincore", "~@privileged @resources"]
    assert settings["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert settings["PrivateNetwork"] == ["yes"]
    assert settings["ProtectProc"] == ["invisible"]
    assert settings["UMask"] == ["0077"]
    assert settings["StateDirectory"] == ["ramd"]
    # SO_PEERCRED must see the clients' real uids for allow-uids/readonly-uids.
    assert "PrivateUsers" not in settings
    sysusers = (UNIT_DIR / "ramd.sysusers").read_text()
    assert any(line.split()[:2] == ["u", "ramd"] for line in sysusers.splitlines())


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_service_exposure_is_at_most_2(tmp_path: Path) -> None:
    unit = tmp_path / "ramd.service"
    unit.write_text((UNIT_DIR / "ramd.service").read_text())
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for ramd\.service: (\d+\.\d+)", proc.stdout)
    assert match is not None, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


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


SANDBOX_TOOLS = ("unshare", "setpriv", "systemd-analyze")


@pytest.mark.skipif(
    os.getuid() != 0 or any(shutil.which(t) is None for t in SANDBOX_TOOLS),
    reason="needs root, unshare, setpriv and systemd-analyze",
)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_daemon_serves_inside_the_units_sandbox(tmp_path: Path, loop: str) -> None:
    """As much of ramd.service as runs without systemd as PID 1: a private network namespace
    (PrivateNetwork=), CAP_IPC_LOCK as the only capability (CapabilityBoundingSet=,
    AmbientCapabilities=), no_new_privs (NoNewPrivileges=) and the unit's SystemCallFilter=
    lines with SystemCallErrorNumber=EPERM. uid 0 keeps no privilege (securebits noroot);
    the dedicated user is left out because the test interpreter may live where another uid
    cannot read it."""
    filters = _settings("ramd.service")["SystemCallFilter"]
    allow = filters[0]
    deny = " ".join(f.removeprefix("~") for f in filters[1:])
    wrap = [
        "unshare",
        "--net",
        "setpriv",
        "--inh-caps=-all,+ipc_lock",
        "--ambient-caps=-all,+ipc_lock",
        "--bounding-set=-all,+ipc_lock",
        "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
        "--no-new-privs",
        "--",
        sys.executable,
        str(Path(__file__).with_name("seccomp_exec.py")),
        allow,
        deny,
        "--",
    ]
    d = Daemon(tmp_path, "", "--event-loop", loop, wrap=wrap)
    try:
        status = Path(f"/proc/{d.pid}/status").read_text()
        assert "CapEff:\t0000000000004000" in status and "Seccomp:\t2" in status
        assert os.readlink(f"/proc/{d.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        with Raw(d.path) as rpc:
            # 64 MiB locked: over the default RLIMIT_MEMLOCK, allowed by CAP_IPC_LOCK.
            assert rpc.call("ram-block-add", id="l", size=64 << 20, lock=True)["lock"]
            rpc.call("ram-block-add", id="p", size=32 << 20, prealloc=True)
            (pre,) = rpc.call("query-ram-blocks", id="p", resident=True)
            assert pre["resident"] == 32 << 20
            rpc.call("ram-block-add", id="r", size=4096, hugepages=True, **{"max-size": 1 << 30})
            assert rpc.call("ram-block-resize", id="r", size=8 << 20)["size"] == 8 << 20
            rpc.call("ram-block-discard", id="l", offset=0, length=1 << 20)
            assert rpc.call("query-stats")["blocks"] == 3
    finally:
        assert d.stop() == 0, d.log_text()
    assert "Traceback" not in d.log_text()
    assert not d.path.exists()
