"""Packaging: the wheel built from the tree holds every package of the tree, its metadata is
right, and ``pip install`` of it (no extras) into a fresh virtualenv gives a working ``ramd``
and ``ramctl``. Slow (a wheel build and a venv): about a minute."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import ramd

ROOT = Path(__file__).resolve().parent.parent
# Where each top-level package lives in the tree (pyproject's packages.find "where").
PACKAGE_ROOTS = (ROOT, ROOT / "client")
TOP_LEVEL = ("ramd", "ramd_client")
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


def tree_packages() -> set[str]:
    """Every package (a directory with ``__init__.py``) under the top-level ones."""
    found = set()
    for base in PACKAGE_ROOTS:
        for top in TOP_LEVEL:
            for init in (base / top).rglob("__init__.py") if (base / top).is_dir() else ():
                found.add(".".join(init.parent.relative_to(base).parts))
    return found


def pip(python: Path | str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", *args, "--disable-pip-version-check", "-q"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of a copy of the tree (building in place would leave build/ behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    p = pip(sys.executable, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src))
    assert p.returncode == 0, p.stderr
    (built,) = (tmp / "dist").glob("ramd-*.whl")
    return built


def test_wheel_holds_every_package_of_the_tree(wheel: Path) -> None:
    expected = tree_packages()
    assert {"ramd", "ramd.api", "ramd.hostmem", "ramd.transport", "ramd_client"} <= expected
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    packaged = {
        name.removesuffix("/__init__.py").replace("/", ".")
        for name in names
        if name.endswith("/__init__.py")
    }
    assert packaged == expected
    assert "ramd/py.typed" in names and "ramd_client/py.typed" in names
    modules = {n for n in names if n.endswith(".py")}
    for base in PACKAGE_ROOTS:
        for top in TOP_LEVEL:
            for source in (base / top).rglob("*.py") if (base / top).is_dir() else ():
                assert source.relative_to(base).as_posix() in modules


def test_wheel_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        info = f"ramd-{ramd.__version__}.dist-info"
        metadata = z.read(f"{info}/METADATA").decode()
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
    assert wheel.name.startswith(f"ramd-{ramd.__version__}-")
    assert f"\nVersion: {ramd.__version__}\n" in metadata
    assert "\nLicense-Expression: GPL-2.0-or-later\n" in metadata
    assert re.search(r"^Requires-Dist: pydantic<3,>=2\.12$", metadata, re.MULTILINE)
    assert "GNU GENERAL PUBLIC LICENSE" in license_text and "Version 2, June 1991" in license_text
    assert (ROOT / "LICENSE").read_text() == license_text


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalized (PEP 503)."""
    return canonicalize_name(Requirement(requirement).name)


def _pins(name: str) -> dict[str, Version]:
    """The versions a constraints file of .ci/ pins, with those of the files it includes."""
    pins: dict[str, Version] = {}
    for line in (ROOT / ".ci" / name).read_text().splitlines():
        if line.startswith("-c "):
            pins.update(_pins(line.removeprefix("-c ").strip()))
        elif line and not line.startswith("#"):
            dist, version = line.split("==")
            pins[canonicalize_name(dist)] = Version(version)
    return pins


def _runtime_closure(names: list[str]) -> set[str]:
    """These distributions and everything they require on this platform, as installed."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            for requirement in map(Requirement, importlib.metadata.requires(name) or ()):
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    todo.append(canonicalize_name(requirement.name))
    return seen


def test_ci_pins_every_dependency_and_runs_on_the_declared_minimums() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = [*project["dependencies"], *extras["fast"]]
    pinned, minimum = _pins("constraints.txt"), _pins("constraints-min.txt")
    for name in _runtime_closure([_name(r) for r in runtime]) | {_name(r) for r in extras["test"]}:
        assert name in pinned and name in minimum, name
    for requirement in map(Requirement, runtime):
        (lower,) = (spec.version for spec in requirement.specifier if spec.operator == ">=")
        name = canonicalize_name(requirement.name)
        assert minimum[name] == Version(lower), requirement
        assert pinned[name] in requirement.specifier, requirement
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".ci/constraints.txt" in ci and ".ci/constraints-min.txt" in ci


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtualenv with the wheel installed, no extras, from a local wheelhouse of the
    versions installed here (``pip install --no-index``: nothing else can sneak in).

    Filling the wheelhouse needs the package index (or a mirror, or pip's cache); without
    one the test is skipped, saying so."""
    tmp = tmp_path_factory.mktemp("venv")
    house = tmp / "wheelhouse"
    pins = tmp / "pins.txt"
    frozen = pip(sys.executable, "freeze", "--exclude-editable")
    assert frozen.returncode == 0, frozen.stderr
    pins.write_text(frozen.stdout)
    got = pip(sys.executable, "wheel", "-c", str(pins), "-w", str(house), str(wheel))
    if got.returncode != 0:
        pytest.skip(f"cannot fetch the runtime dependencies (offline?): {got.stderr}")
    venv = tmp / "venv"
    # Without a pip of its own (ensurepip alone takes seconds): this pip installs into it.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300
    )
    p = pip(
        sys.executable,
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "--no-index",
        "--find-links",
        str(house),
        str(wheel),
    )
    assert p.returncode == 0, p.stderr
    yield venv


def test_plain_install_gives_working_ramd_and_ramctl(fresh_venv: Path, tmp_path: Path) -> None:
    bindir = fresh_venv / "bin"
    version = subprocess.run(
        [str(bindir / "ramd"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout == f"ramd {ramd.__version__}\n"
    helped = subprocess.run(
        [str(bindir / "ramctl"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "usage: ramctl" in helped.stdout
    # No test extra came along.
    p = subprocess.run([str(bindir / "python"), "-c", "import pytest"], capture_output=True)
    assert p.returncode != 0
    # The installed daemon serves, the installed ramctl drives it.
    sock = tmp_path / "ramd.sock"
    daemon = subprocess.Popen(
        [str(bindir / "ramd"), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            p = subprocess.run(
                [str(bindir / "ramctl"), "--socket", str(sock), "add", "ram0", "1M"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if p.returncode != 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert p.returncode == 0, p.stderr
        listed = subprocess.run(
            [str(bindir / "ramctl"), "--socket", str(sock), "list", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0 and '"id": "ram0"' in listed.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
