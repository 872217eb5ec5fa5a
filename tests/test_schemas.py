"""``schemas/ramd.schema.json``: current, served by ``query-schema``, and the contract that
the client's requests (and the daemon's verdicts on bad ones) agree with."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ramd_client
from client_support import WireRecorder, arguments_validator, params_valid
from daemon import Daemon, Raw

from ramd.api.commands import COMMANDS
from ramd.api.models import EVENT_NAMES

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "ramd.schema.json"
MiB = 1 << 20


def test_schema_file_is_the_generator_output() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "ramd.api.schema"],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    ).stdout.decode()
    assert SCHEMA_FILE.read_text() == generated, (
        "schemas/ramd.schema.json is stale: "
        "run `python -m ramd.api.schema > schemas/ramd.schema.json`"
    )


def test_schema_is_a_valid_json_schema_covering_everything() -> None:
    doc = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["commands"].keys() == COMMANDS.keys()
    assert set(doc["events"]) == set(EVENT_NAMES)
    for name in COMMANDS:  # every $ref resolves
        arguments_validator(name).is_valid({})


async def test_query_schema_returns_the_file(reused_daemon: Daemon) -> None:
    async with await ramd_client.connect(reused_daemon.path) as client:
        assert await client.query_schema() == json.loads(SCHEMA_FILE.read_text())
        names = {c.name for c in await client.query_commands()}
        assert names == set(json.loads(SCHEMA_FILE.read_text())["commands"])


FD_COMMANDS = {"ram-block-get-fd", "ram-block-put-fd", "ram-block-ack", "getfd", "closefd"}
#: Need a running VMM: validated by tests/test_vmm.py (test_the_clients_attach_requests_validate).
VMM_COMMANDS = {"ram-block-attach", "ram-block-detach"}


async def test_every_request_of_the_client_validates(daemon: Daemon) -> None:
    wire = WireRecorder()
    async with await ramd_client.connect(daemon.path, trace=wire.trace()) as c:
        await c.ram_block_add("ram0", MiB, max_size=4 * MiB, merge=True, dump=False)
        await c.ram_block_add("ram1", MiB, prealloc=True, lock=True, hugepages=True, align=MiB)
        await c.ram_block_resize("ram0", 2 * MiB)
        await c.query_ram_blocks()
        await c.query_ram_blocks("ram0")
        await c.ram_block_write("ram0", 4096, b"data")
        await c.ram_block_read("ram0", 4096, 4)
        await c.ram_block_discard("ram0", 0, 4096)
        async with c.events(["RAM_BLOCK_REMOVED"], replay=False) as events:
            await c.ram_block_del("ram1", mode="hard")
            assert (await anext(events)).data.id == "ram1"
        save = await c.ram_save("img", blocks=["ram0"])
        await c.query_jobs()
        with pytest.raises(ramd_client.RamdError):
            await c.job_cancel("nosuchjob")
        while {j.status for j in await c.query_jobs()} != {"concluded"}:
            await asyncio.sleep(0.05)
        load = await c.ram_load("img")
        while {j.status for j in await c.query_jobs()} != {"concluded"}:
            await asyncio.sleep(0.05)
        await c.job_dismiss(save)
        await c.job_dismiss(load)
        assert [i.name for i in await c.query_images()] == ["img"]
        await c.image_remove("img")
        await c.ram_block_resize("ram0", MiB, mode="hard")
        await c.ram_block_add("tpl", MiB, backend="memfd")
        assert (await c.ram_block_seal("tpl")).sealed
        assert await c.query_pools() == []
        with pytest.raises(ramd_client.RamdError, match="Pool 'none' not found"):
            await c.ram_block_add_from_pool("ram2", "none")
        await c.query_stats()
        await c.query_commands()
        await c.query_schema()
        assert "ram0" in await c.human_monitor_command("info ramblock")
        assert {i["name"] for i in await c.query_qmp_schema()} >= set(COMMANDS)
        await c.ram_block_del("ram0")  # quit refuses while it would free a block
        await c.ram_block_del("tpl")
        await c.quit()  # last: the daemon shuts down once it has answered
    requests = wire.requests()
    # fd passing needs a socket of its own (SCM_RIGHTS): ramd_client.shared sends
    # ram-block-get-fd/-put-fd/-ack, validated by tests/test_shared_client.py
    # (test_every_request_of_the_shared_client_validates); getfd/closefd are sent raw by
    # tests/test_shared_fds.py (no client sends them).
    assert {method for method, _ in requests} == set(COMMANDS) - FD_COMMANDS - VMM_COMMANDS
    for method, params in requests:
        errors = [e.message for e in arguments_validator(method).iter_errors(params)]
        assert not errors, (method, params, errors)
    wire.check()


async def test_a_wrong_request_fails_the_schema_as_it_fails_the_daemon(
    reused_daemon: Daemon,
) -> None:
    wire = WireRecorder()
    async with await ramd_client.connect(reused_daemon.path, trace=wire.trace()) as c:
        with pytest.raises(ramd_client.RamdError) as info:
            await c.ram_block_add("ram0", 0)
        assert info.value.invalid_params
    method, params = wire.requests()[-1]
    assert (method, params) == ("ram-block-add", {"id": "ram0", "size": 0})
    assert not params_valid(method, params)
    wire.check()  # agrees: refused by the reused_daemon, refused by the schema


WRONG: list[tuple[str, dict[str, Any]]] = [
    ("ram-block-add", {"id": "ram0", "size": "64M"}),
    ("ram-block-add", {"id": "ram0", "size": 0}),
    ("ram-block-add", {"id": "ram0", "size": 2**64}),
    ("ram-block-add", {"size": MiB}),
    ("ram-block-add", {"id": "0ram", "size": MiB}),
    ("ram-block-add", {"id": "ram0", "size": MiB, "prealloc": "yes"}),
    ("ram-block-add", {"id": "ram0", "size": MiB, "max_size": 2 * MiB}),
    ("ram-block-resize", {"id": "ram0", "size": 1.5}),
    ("ram-block-read", {"id": "ram0", "offset": -1, "length": 1}),
    ("ram-block-write", {"id": "ram0", "offset": 0, "data": 42}),
    ("ram-block-discard", {"id": "ram0", "offset": 0}),
    ("query-ram-blocks", {"id": ""}),
    ("subscribe", {"events": ["RAM_BLOCK_EXPLODED"]}),
    ("subscribe", {"replay": 1}),
    ("query-stats", {"verbose": True}),
]


@pytest.mark.parametrize(("method", "params"), WRONG, ids=[f"{m}-{p}" for m, p in WRONG])
def test_wrong_params_fail_the_schema_and_the_daemon(
    reused_daemon: Daemon, method: str, params: dict[str, Any]
) -> None:
    assert not params_valid(method, params)
    with Raw(reused_daemon.path) as raw:
        assert raw.error(method, params)["code"] == -32602
