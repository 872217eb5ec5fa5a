"""QEMU fidelity of the QMP dialect (issue 15, docs/protocol.md §5): ``query-version`` in QEMU's
shape, ``human-monitor-command`` (through ``qmp-shell -H`` too), ``query-qmp-schema`` in
QEMU's introspection format, and ``quit``. Driven by qemu.qmp's ``QMPClient`` and
``qmp-shell`` against the real daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw
from qemu.qmp import ExecuteError
from qmp_client_support import qmp_client

import ramd
from ramd.api.commands import COMMANDS, version_triple
from ramd.api.hmp import size_to_str
from ramd.api.models import EVENT_NAMES

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
VERSION = version_triple().model_dump()
PACKAGE = f"ramd {ramd.__version__}"

#: QEMU's ``info ramblock`` header (``ram_block_format`` in ``system/physmem.c``).
HEADER = (
    "              Block Name    PSize              Offset               Used"
    "              Total                HVA  RO\r\n"
)
HELP = (
    "help|? [cmd] -- show the help\r\n"
    "info [subcommand] -- show various information about the system state\r\n"
)
INFO_HELP = "info ramblock  -- Display system ramblock information\r\n"


def row(block: dict[str, Any], host: int) -> str:
    """One ``info ramblock`` line, with C's printf format of QEMU's ``ram_block_format``."""
    return "%24s %8s  0x%016x 0x%016x 0x%016x 0x%016x %3s\r\n" % (  # noqa: UP031
        block["id"],
        {PAGE: "4 KiB"}[block["page-size"]],
        block["offset"],
        block["size"],
        block["max-size"],
        host,
        "rw",
    )


def wait_exit(d: Daemon, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while d.alive():
        assert time.monotonic() < deadline, "the daemon did not exit after quit"
        time.sleep(0.05)
    return d.stop()


# -- query-version ----------------------------------------------------------------------------


async def test_query_version_has_qemus_shape_on_qmp_and_stays_on_jsonrpc(
    any_daemon: Daemon,
) -> None:
    d = any_daemon
    async with qmp_client(d.qmp_path) as qmp:
        assert await qmp.execute("query-version") == {"qemu": VERSION, "package": PACKAGE}
        greeting = qmp.greeting
        assert greeting is not None and greeting.QMP.version == {
            "qemu": VERSION,
            "package": PACKAGE,
        }
    with Raw(d.path) as rpc:
        assert rpc.call("query-version") == {"version": VERSION, "package": PACKAGE}


# -- human-monitor-command --------------------------------------------------------------------


def test_size_to_str_is_qemus() -> None:
    assert [size_to_str(v) for v in (512, 999, 1000, 1536, PAGE, 2 * MiB, GiB, 2**64 - 1)] == [
        "512 B", "999 B", "0.977 KiB", "1.5 KiB", "4 KiB", "2 MiB", "1 GiB", "16 EiB",
    ]  # fmt: skip


async def test_hmp_commands_print_qemus_text(any_daemon: Daemon) -> None:
    d = any_daemon
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="pc.ram", size=MiB, **{"max-size": GiB})
        rpc.call("ram-block-add", id="vga.vram", size=16 * PAGE, backend="memfd")
        blocks = rpc.call("query-ram-blocks")
        over_jsonrpc = rpc.call("human-monitor-command", **{"command-line": "info ramblock"})
    expected = HEADER + "".join(row(b, b["host"]) for b in blocks)
    assert over_jsonrpc == expected
    async with qmp_client(d.qmp_path) as qmp:

        async def hmp(line: str, **extra: Any) -> Any:
            return await qmp.execute("human-monitor-command", {"command-line": line, **extra})

        assert await hmp("info ramblock") == expected
        assert await hmp("  info   ramblock  ", **{"cpu-index": 0}) == expected
        assert await hmp("help") == await hmp("?") == await hmp("help   ") == HELP
        assert await hmp("info") == await hmp("help info") == INFO_HELP
        assert await hmp('help "info" ramblock') == INFO_HELP
        assert await hmp("help help") == "help|? [cmd] -- show the help\r\n"
        assert await hmp("") == await hmp(" \t ") == ""
        assert await hmp("foo") == "unknown command: 'foo'\r\n"
        assert await hmp("  foo bar") == "unknown command: '  foo'\r\n"
        assert await hmp("quit/x") == "unknown command: 'quit'\r\n"
        assert await hmp("info foo") == "unknown command: 'info foo'\r\n"
        assert await hmp("help foo") == "unknown command: 'foo'\r\n"
        assert await hmp("help info foo") == "unknown command: 'info foo'\r\n"
        assert await hmp("info ramblock extra ") == (
            "ramblock: extraneous characters at the end of line\r\n"
            'Try "help info ramblock" for more information\r\n'
        )
        assert await hmp('help "unterminated') == ""
        assert await hmp("\u00e9t\u00e9") == "unknown command: '\u00e9t\u00e9'\r\n"
        for arguments, desc in [
            ({}, "Parameter 'command-line' is missing"),
            ({"command-line": 1}, "Invalid parameter type for 'command-line', expected: string"),
            (
                {"command-line": "help", "cpu-index": "0"},
                "Invalid parameter type for 'cpu-index', expected: integer",
            ),
        ]:
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("human-monitor-command", arguments)
            assert (err.value.error_class, err.value.error.error.desc) == ("GenericError", desc)
        assert await qmp.execute("query-ram-blocks") == blocks


def test_qmp_shell_hmp_mode_runs_info_ramblock(any_daemon: Daemon, tmp_path: Path) -> None:
    d = any_daemon
    with Raw(d.path) as rpc:
        block = rpc.call("ram-block-add", id="ram0", size=4 * MiB, **{"max-size": GiB})
    shell = Path(sys.executable).with_name("qmp-shell")
    proc = subprocess.run(
        [str(shell), "-H", str(d.qmp_path)],
        input=b"info ramblock\nhelp\nnope\n",
        capture_output=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},  # its history file goes there
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "Welcome to the HMP shell!" in out
    assert "Traceback" not in out + proc.stderr.decode()
    assert HEADER in out and row(block, block["host"]) in out
    assert HELP in out and "unknown command: 'nope'\r\n" in out


# -- query-qmp-schema -------------------------------------------------------------------------

_META = {"builtin", "enum", "array", "object", "alternate", "command", "event"}
_JSON = {"int": int, "str": str, "bool": bool, "number": (int, float)}


class Introspection:
    """A reader of QEMU's ``SchemaInfo`` list, as QMP tooling uses one: find a command's
    types and check a value against a type."""

    def __init__(self, infos: list[dict[str, Any]]) -> None:
        self.types = {i["name"]: i for i in infos}
        assert len(self.types) == len(infos), "duplicate names"
        self.infos = infos

    def referenced(self, info: dict[str, Any]) -> list[str]:
        meta = info["meta-type"]
        if meta == "command":
            return [info["arg-type"], info["ret-type"]]
        if meta == "event":
            return [info["arg-type"]]
        if meta == "array":
            return [info["element-type"]]
        if meta == "alternate":
            return [m["type"] for m in info["members"]]
        if meta == "object":
            variants = [v["type"] for v in info.get("variants", ())]
            return [m["type"] for m in info["members"]] + variants
        return []

    def check(self, value: Any, name: str) -> None:
        """``value`` is of type ``name`` (AssertionError otherwise)."""
        t = self.types[name]
        meta = t["meta-type"]
        if meta == "builtin":
            if t["json-type"] != "value":
                assert isinstance(value, _JSON[name]) and (name == "bool") is isinstance(
                    value, bool
                ), (value, name)
        elif meta == "enum":
            assert value in t["values"], (value, name)
        elif meta == "array":
            assert isinstance(value, list), (value, name)
            for v in value:
                self.check(v, t["element-type"])
        elif meta == "object":
            members = {m["name"]: m for m in t["members"]}
            assert isinstance(value, dict), (value, name)
            if "tag" in t:  # a flat union: the tag's case adds its variant's members
                (case,) = [v["type"] for v in t["variants"] if v["case"] == value[t["tag"]]]
                members |= {m["name"]: m for m in self.types[case]["members"]}
            assert set(value) <= set(members), (value, name)
            for key, m in members.items():
                if key in value:
                    self.check(value[key], m["type"])
                else:
                    assert "default" in m, f"{name}: required member {key} missing"
        else:
            raise AssertionError(f"unexpected {meta} {name}")


async def test_query_qmp_schema_describes_every_command_event_and_answer(
    any_daemon: Daemon,
) -> None:
    d = any_daemon
    async with qmp_client(d.qmp_path) as qmp:
        infos: Any = await qmp.execute("query-qmp-schema")
        schema = Introspection(infos)
        for info in infos:
            assert info["meta-type"] in _META, info
            for ref in schema.referenced(info):
                assert ref in schema.types, f"{info['name']} refers to unknown type {ref}"
        commands = {i["name"]: i for i in infos if i["meta-type"] == "command"}
        events = {i["name"]: i for i in infos if i["meta-type"] == "event"}
        assert set(commands) == {*COMMANDS, "qmp_capabilities"}
        assert set(events) == set(EVENT_NAMES)
        names = {c["name"] for c in await qmp.execute("query-commands")}  # type: ignore[union-attr]
        assert names <= set(commands)
        for builtin, json_type in [("int", "int"), ("str", "string"), ("bool", "boolean")]:
            assert schema.types[builtin] == {
                "name": builtin, "meta-type": "builtin", "json-type": json_type,
            }  # fmt: skip
        add_args = {
            m["name"]: m for m in schema.types[commands["ram-block-add"]["arg-type"]]["members"]
        }
        assert "default" not in add_args["id"]
        # size is required unless the block comes from a pool (docs/protocol.md §14)
        assert add_args["size"] == {"name": "size", "type": "int", "default": None}
        assert add_args["pool"] == {"name": "pool", "type": "str", "default": None}
        assert add_args["max-size"] == {"name": "max-size", "type": "int", "default": None}
        assert schema.types[add_args["backend"]["type"]]["values"] == ["anonymous", "memfd", "file"]
        events_arg = schema.types[commands["subscribe"]["arg-type"]]["members"][0]
        assert events_arg["name"] == "events" and events_arg["type"].startswith("[")

        # The answers and events this session gets all fit their introspected types.
        def check_answer(command: str, value: Any) -> None:
            schema.check(value, commands[command]["ret-type"])

        got: list[dict[str, Any]] = []
        with qmp.listener() as listener:
            calls: list[tuple[str, dict[str, Any]]] = [
                ("ram-block-add", {"id": "a", "size": PAGE, "max-size": 4 * PAGE}),
                ("ram-block-add", {"id": "b", "size": PAGE, "backend": "memfd"}),
                ("ram-block-resize", {"id": "a", "size": 2 * PAGE}),
                ("query-ram-blocks", {"resident": True}),
                ("ram-block-write", {"id": "a", "offset": 0, "data": "AAAA"}),
                ("ram-block-read", {"id": "a", "offset": 0, "length": 3}),
                ("ram-block-discard", {"id": "a", "offset": 0, "length": PAGE}),
                ("subscribe", {"events": ["RAM_BLOCK_REMOVED"], "replay": False}),
                ("ram-block-del", {"id": "b"}),
                ("unsubscribe", {}),
                ("query-stats", {}),
                ("query-version", {}),
                ("query-commands", {}),
                ("query-schema", {}),
                ("human-monitor-command", {"command-line": "info ramblock"}),
                ("query-qmp-schema", {}),
            ]
            for command, arguments in calls:
                schema.check(arguments, commands[command]["arg-type"])
                check_answer(command, await qmp.execute(command, arguments))
            while len(got) < 4:  # added x2, resized, removed
                got.append(await asyncio.wait_for(listener.get(), 10))
        for event in got:
            schema.check(event["data"], events[event["event"]]["arg-type"])
        with pytest.raises(AssertionError):  # the checker does check
            check_answer("query-version", {"version": VERSION, "package": PACKAGE})
    with Raw(d.path) as rpc:
        assert rpc.call("query-qmp-schema") == infos


# -- quit and read-only peers -----------------------------------------------------------------


async def test_quit_answers_then_the_daemon_exits_and_removes_its_sockets(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon(qmp=True)
    async with qmp_client(d.qmp_path) as qmp:
        assert await qmp.execute("quit") == {}
    assert await asyncio.to_thread(wait_exit, d) == 0
    assert d.qmp_path is not None and not d.qmp_path.exists() and not d.path.exists()
    log = d.log_text()
    assert "quit - by pid=" in log and "shutting down" in log


def test_quit_over_jsonrpc_finishes_its_batch_first(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    with Raw(d.path) as rpc:
        rpc.send(
            b'[{"jsonrpc":"2.0","method":"quit","id":1},'
            b'{"jsonrpc":"2.0","method":"query-ram-blocks","id":2}]'
        )
        assert rpc.reply() == [
            {"jsonrpc": "2.0", "result": {}, "id": 1},
            {"jsonrpc": "2.0", "result": [], "id": 2},
        ]
    assert wait_exit(d) == 0 and not d.path.exists()


async def test_read_only_peer_may_query_but_not_quit_and_sees_no_host(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon(
        f'readonly-uids = [{os.getuid()}]\n[[block]]\nid = "ram0"\nsize = "1M"\n', qmp=True
    )
    async with qmp_client(d.qmp_path) as qmp:
        (block,) = await qmp.execute("query-ram-blocks")  # type: ignore[misc]
        assert "host" not in block
        text = await qmp.execute("human-monitor-command", {"command-line": "info ramblock"})
        assert text == HEADER + row(block, 0)
        assert await qmp.execute("query-qmp-schema")
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("quit")
        assert err.value.error_class == "GenericError"
        assert err.value.error.error.desc == "Permission denied: read-only peer may not run 'quit'"
        assert await qmp.execute("query-version") == {"qemu": VERSION, "package": PACKAGE}
    assert d.alive()
    with Raw(d.path) as rpc:
        assert rpc.error("quit")["message"].startswith("Permission denied")
    assert d.stop() == 0
