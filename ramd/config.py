"""The daemon's configuration: TOML file, command-line overrides, embedded defaults.

Keys are kebab-case; sizes are integers or strings with QEMU suffixes (``64M``, ``1.5G``).
Every key is validated; the first bad one is reported by :class:`ConfigError` with its dotted
name (``limits.max-blocks``, ``block[0].size``).
"""

from __future__ import annotations

import grp
import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ramd.ids import ID_PATTERN
from ramd.metrics.address import MetricsAddress, parse_metrics_address
from ramd.process import paths
from ramd.sizes import parse_size

U64_MAX = 2**64 - 1
MiB = 1024 * 1024


def _size(value: Any) -> Any:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return parse_size(value)
    return value


def _mode(value: Any) -> Any:
    if isinstance(value, str):
        return int(value, 8)
    return value


ConfigSize = Annotated[StrictInt, BeforeValidator(_size), Field(ge=0, le=U64_MAX)]
PositiveSize = Annotated[StrictInt, BeforeValidator(_size), Field(gt=0, le=U64_MAX)]


def _group(value: Any) -> Any:
    """A group name must exist when the config is read (exit 2, not a half-made socket)."""
    if isinstance(value, str):
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"no such group {value!r}") from None
    return value


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, frozen=True)


class Limits(_Section):
    """Bounds on what clients can make the daemon hold. 0 means unlimited where noted."""

    max_message_size: PositiveSize = 8 * MiB
    max_depth: Annotated[StrictInt, Field(gt=0, le=10_000)] = 1024
    max_connections: Annotated[StrictInt, Field(gt=0)] = 256
    #: Connections one non-root uid may hold at once (uid 0 has no per-uid share).
    max_connections_per_uid: Annotated[StrictInt, Field(gt=0)] = 64
    max_blocks: Annotated[StrictInt, Field(gt=0)] = 16384
    #: Sum of ``max-size`` + guard page over all blocks; 0 = the host default
    #: (:mod:`ramd.hostlimits`: half of the user address space).
    max_reserved: ConfigSize = 0
    #: Sum of ``size`` over all blocks; 0 = the host default (:mod:`ramd.hostlimits`:
    #: RAM + swap, or the memory cgroup's limit when lower).
    max_used: ConfigSize = 0
    io_chunk: PositiveSize = 4 * MiB
    subscriber_queue: Annotated[StrictInt, Field(gt=0)] = 1024
    #: Members of one JSON-RPC batch.
    max_batch: Annotated[StrictInt, Field(gt=0)] = 1024
    #: Seconds after which a connection that sent nothing and receives no events is closed;
    #: 0 = never.
    idle_timeout: Annotated[StrictInt | StrictFloat, Field(ge=0)] = 300
    #: Seconds a shrink or removal waits for every mapper's ``ram-block-ack``.
    ack_timeout: Annotated[StrictInt | StrictFloat, Field(gt=0)] = 5


class BlockConfig(_Section):
    """A ``[[block]]`` created at start-up: the arguments of ``ram-block-add``."""

    id: StrictStr
    size: PositiveSize
    max_size: PositiveSize | None = None
    backend: Literal["anonymous", "memfd", "file"] = "anonymous"
    hugetlb: StrictBool = False
    prealloc: StrictBool = False
    merge: StrictBool = False
    dump: StrictBool = True
    hugepages: StrictBool = False
    lock: StrictBool = False
    align: PositiveSize | None = None


class PoolConfig(_Section):
    """A ``[[pool]]`` (docs/protocol.md §14): ``count`` blocks of ``size`` bytes kept ready."""

    name: Annotated[StrictStr, Field(pattern=ID_PATTERN)]
    size: PositiveSize
    count: Annotated[StrictInt, Field(ge=1, le=64)]
    backend: Literal["memfd", "anonymous"] = "memfd"
    hugetlb: StrictBool = False
    max_size: PositiveSize | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PoolConfig:
        if self.max_size is not None and self.max_size < self.size:
            raise PydanticCustomError(
                "pool", "max-size {max} is smaller than size {size}", _sizes(self)
            )
        if self.hugetlb and self.backend == "anonymous":
            raise PydanticCustomError("pool", "hugetlb needs backend memfd", {})
        return self


def _sizes(pool: PoolConfig) -> dict[str, int]:
    return {"max": pool.max_size or 0, "size": pool.size}


def _unique_pools(pools: list[PoolConfig]) -> list[PoolConfig]:
    seen = set()
    for pool in pools:
        if pool.name in seen:
            raise ValueError(f"pool '{pool.name}' is defined twice")
        seen.add(pool.name)
    return pools


#: root's ``state-dir`` when the config names none and systemd's ``StateDirectory=`` sets
#: nothing.
DEFAULT_STATE_DIR = paths.SYSTEM_STATE_DIR


def default_memory_dir() -> Path:
    """:func:`ramd.process.paths.default_memory_dir`: ``$XDG_RUNTIME_DIR/ramd/memory``, else
    ``/run/ramd/memory``."""
    return Path(paths.default_memory_dir())


def default_state_dir() -> Path:
    """:func:`ramd.process.paths.default_state_dir`: ``$STATE_DIRECTORY``, else ``/var/lib/ramd``
    for root, else the user's ``$XDG_STATE_HOME/ramd`` or ``~/.local/state/ramd``."""
    return Path(paths.default_state_dir())


class Config(_Section):
    socket: Path | None = None
    qmp_socket: Path | None = None
    socket_mode: Annotated[StrictInt, BeforeValidator(_mode), Field(ge=0, le=0o777)] = 0o600
    #: Group of the socket files ramd creates (a name or a gid), and of the directories it
    #: creates for them (then 0750).
    socket_group: Annotated[StrictStr | StrictInt | None, AfterValidator(_group)] = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    #: ``uvloop`` needs the optional ``fast`` extra; the plain asyncio loop is the default.
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    #: Directory of ``file`` blocks (created 0700 and checked at start; a bad one refuses
    #: ``file`` blocks, not the start).
    memory_dir: Path = Field(default_factory=default_memory_dir)
    #: Directory of ``ram-save``/``ram-load`` image files (created 0700 and checked at start;
    #: a bad one is reported, and saves and loads to files fail).
    state_dir: Path = Field(default_factory=default_state_dir)
    allow_uids: list[StrictInt] = []
    allow_gids: list[StrictInt] = []
    readonly_uids: list[StrictInt] = []
    readonly_gids: list[StrictInt] = []
    #: Seconds SIGTERM waits for commands in flight (a prealloc, a lock) before exiting;
    #: systemd's default stop timeout, which the unit's ``TimeoutStopSec=`` matches.
    stop_timeout: Annotated[StrictInt | StrictFloat, Field(ge=0)] = 90
    #: Serve ``metrics-listen`` on a non-loopback address (docs/protocol.md §15). Declared before
    #: ``metrics-listen``, whose check reads it.
    metrics_remote: StrictBool = False
    #: Where ``GET /metrics`` is served: ``"unix:PATH"`` or ``"HOST:PORT"``; none by default.
    metrics_listen: StrictStr | None = None
    limits: Limits = Limits()
    block: list[BlockConfig] = []
    pool: Annotated[list[PoolConfig], AfterValidator(_unique_pools)] = []

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_metrics_address(value, remote=bool(info.data.get("metrics_remote")))
        return value

    def metrics_address(self) -> MetricsAddress | None:
        """``metrics-listen`` parsed (None when unset); valid by construction."""
        if self.metrics_listen is None:
            return None
        return parse_metrics_address(self.metrics_listen, remote=self.metrics_remote)

    def socket_gid(self) -> int | None:
        """``socket-group`` as a gid (None when unset)."""
        group = self.socket_group
        if isinstance(group, str):
            try:
                return grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"config: socket-group: no such group {group!r}") from None
        return group


class ConfigError(Exception):
    """A bad configuration; the message names the key."""


def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a parsed TOML document."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{source}: {_key(err['loc'])}: {msg}") from None


#: The largest configuration file read (a device or a runaway file must not fill memory).
MAX_CONFIG_SIZE = 1024 * 1024


def read_config_file(path: str | os.PathLike[str], *, reload: bool = False) -> str:
    """The text of the configuration file ``path``, at most ``MAX_CONFIG_SIZE`` bytes.

    On ``reload`` (SIGHUP, on the event loop's thread) it must be a non-empty regular file,
    opened without blocking: a FIFO (whose open or read would wait for a writer) or a device
    is refused, and so is an empty file, which would silently drop every setting (a file
    being rewritten in place is empty for a moment). ConfigError names what is wrong."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_NONBLOCK if reload else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        if reload and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        data = bytearray()
        while chunk := os.read(fd, 64 * 1024):
            data += chunk
            if len(data) > MAX_CONFIG_SIZE:
                raise ConfigError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({e.reason})") from None
    if reload and not text.strip():
        raise ConfigError(f"{path}: the file is empty")
    return text


def load_config(path: str | os.PathLike[str] | None, *, reload: bool = False) -> Config:
    """Read (see :func:`read_config_file`) and validate ``path``; the embedded defaults
    when ``path`` is None."""
    if path is None:
        return Config()
    text = read_config_file(path, reload=reload)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return parse_config(data, str(path))


def default_socket_path() -> Path:
    """Protocol rule (:func:`ramd.process.paths.default_socket`): ``$RAMD_SOCKET``, else
    ``$XDG_RUNTIME_DIR/ramd/ramd.sock``, else ``/run/ramd/ramd.sock``."""
    return Path(paths.default_socket())
