"""Prepare the test guest: Debian's cloud kernel and ``busybox-static``, fetched with
``apt-get download`` (never installed), and a small initramfs built from them.

Run ``python3 tests/guest/prepare.py`` (``.ci/run`` does, as root); it prints the guest's
directory. Standard library only, so any Python 3.11 runs it.

Cache (``$RAMD_GUEST_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/ramd-guest``):

- ``debs/<package>_<version>/``: the downloaded ``.deb`` of that version;
- ``<kernel release>_<busybox version>_<digest>/``: a finished guest (``vmlinuz``,
  ``initramfs.cpio.gz``, ``manifest.json``), named by the package versions and by
  :func:`digest` of what builds it (this file and ``init``), so a re-run with the same
  versions and sources reuses it;
- ``ready-<digest>``: a symlink to the newest finished guest built from these sources: what
  the tests use (:func:`ready_guest`).

Invariants: a guest directory appears only complete (built under a temporary name, then
renamed); concurrent runs serialise on ``.lock``; a cached run makes no download, and asks
``apt-cache`` for the candidate versions only when apt's package lists changed since the
ready guest was built (candidates cannot change otherwise).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
APT_LISTS = Path("/var/lib/apt/lists")
INIT = HERE / "init"
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
# What the initramfs loads, with every module these depend on (dependencies first).
MODULES = ("virtio_pci", "virtio_mem")


def cache_root() -> Path:
    """Where guests and downloads are cached (see the module docstring)."""
    explicit = os.environ.get("RAMD_GUEST_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ramd-guest"


def digest() -> str:
    """Short hash of the sources that decide a guest's contents (this file and ``init``)."""
    h = hashlib.sha256()
    for source in (Path(__file__).resolve(), INIT):
        h.update(source.read_bytes())
    return h.hexdigest()[:12]


def ready_guest() -> Path | None:
    """The guest built from the current sources, or None when prepare has not run since they
    last changed."""
    link = cache_root() / f"ready-{digest()}"
    return link.resolve() if (link / "manifest.json").is_file() else None


def _apt_show(package: str) -> dict[str, str]:
    """The candidate version's control fields (``apt-cache show``), updating the package lists
    once when apt knows no candidate."""
    cmd = ["apt-cache", "show", "--no-all-versions", package]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0 or not run.stdout.strip():
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    fields: dict[str, str] = {}
    for line in run.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and not key.startswith(" "):
            fields[key] = value
    return fields


def _kernel_package() -> tuple[str, str]:
    """The real kernel package the metapackage depends on, and its candidate version."""
    depends = _apt_show(KERNEL_META)["Depends"]
    name = next(
        d.strip().split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")
    )
    return name, _apt_show(name)["Version"]


def _download(debs: Path, package: str, version: str) -> Path:
    """The package's ``.deb`` in the cache, downloaded when missing."""
    where = debs / f"{package}_{version.replace(':', '%3a')}"
    found = sorted(where.glob("*.deb"))
    if found:
        return found[0]
    tmp = Path(tempfile.mkdtemp(dir=debs, prefix=".dl-"))
    subprocess.run(
        ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
        cwd=tmp,
        check=True,
    )
    tmp.rename(where)
    return next(where.glob("*.deb"))


def _modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` ELF section."""
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize
        )
        return name, offset, size

    strtab = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        start = strtab[1] + name
        if ko[start : ko.index(b"\0", start)] == b".modinfo":
            for entry in ko[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
            return []
    raise ValueError("no .modinfo section")


def _module_name(path: Path) -> str:
    """``virtio_mem`` for ``.../virtio_mem.ko`` (or ``.ko.xz``, ``.ko.gz``, ...)."""
    return path.name.partition(".ko")[0].replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    """A module's ELF image. Debian 12's kernel ships them uncompressed, which busybox's
    ``insmod`` loads; xz or gzip modules (later kernels) are decompressed for it."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix != ".ko":
        raise ValueError(f"cannot decompress {path}")
    return data


def _load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """``wanted`` and everything they depend on, each after its dependencies, as module
    name and ELF image."""
    by_name = {_module_name(p): p for p in modules_dir.rglob("*.ko*")}
    order: dict[str, bytes] = {}

    def visit(name: str) -> None:
        if name in order:
            return
        image = _module_bytes(by_name[name])
        for dep in _modinfo_depends(image):
            visit(dep)
        order[name] = image

    for name in wanted:
        visit(name)
    return list(order.items())


class _Cpio:
    """An initramfs archive (cpio ``newc``), written in memory; files owned by root."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 0

    def _entry(
        self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        fields = (self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, *rdev, len(name) + 1, 0)
        self.data += b"070701" + b"".join(b"%08X" % f for f in fields)
        self.data += name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def _build(out: Path, kernel_deb: Path, busybox_deb: Path, manifest: dict[str, object]) -> None:
    """Extract both packages and write ``vmlinuz``, ``initramfs.cpio.gz``, ``manifest.json``
    into ``out`` (an empty directory)."""
    root = out / "extract"
    subprocess.run(["dpkg-deb", "-x", str(kernel_deb), str(root)], check=True)
    subprocess.run(["dpkg-deb", "-x", str(busybox_deb), str(root)], check=True)
    release = str(manifest["kernel_release"])
    shutil.copyfile(root / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
    modules = _load_order(root / "lib" / "modules" / release, MODULES)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT.read_bytes(), 0o755)
    for name, image in modules:
        cpio.file(f"lib/modules/{name}.ko", image)
    cpio.file("lib/modules/load.order", "".join(f"{name}.ko\n" for name, _ in modules).encode())
    (out / "initramfs.cpio.gz").write_bytes(gzip.compress(cpio.finish(), 6, mtime=0))
    shutil.rmtree(root)
    manifest["modules"] = [name for name, _ in modules]
    _replace(out / "manifest.json", manifest)


def _lists_stamp() -> int:
    """Changes whenever ``apt-get update`` changes the package lists."""
    return APT_LISTS.stat().st_mtime_ns


def prepare() -> Path:
    """The guest for the candidate package versions and the current sources, built unless
    cached; ``ready-<digest>`` points at it afterwards."""
    root = cache_root()
    (root / "debs").mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = _lists_stamp()
        ready = ready_guest()
        if ready is not None and _manifest(ready).get("apt_lists") == stamp:
            return ready
        kernel, kernel_version = _kernel_package()
        busybox_version = _apt_show(BUSYBOX)["Version"]
        release = kernel.removeprefix("linux-image-")
        key = digest()
        guest = root / f"{release}_{busybox_version.replace(':', '%3a')}_{key}"
        if not (guest / "manifest.json").is_file():
            kernel_deb = _download(root / "debs", kernel, kernel_version)
            busybox_deb = _download(root / "debs", BUSYBOX, busybox_version)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
            tmp.chmod(0o755)
            manifest: dict[str, object] = {
                "kernel_package": kernel,
                "kernel_version": kernel_version,
                "kernel_release": release,
                "busybox_version": busybox_version,
                "digest": key,
            }
            try:
                _build(tmp, kernel_deb, busybox_deb, manifest)
                tmp.rename(guest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _replace(guest / "manifest.json", {**_manifest(guest), "apt_lists": stamp})
        _replace_symlink(root / f"ready-{key}", guest.name)
    return guest


def _manifest(guest: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((guest / "manifest.json").read_text())
    return data


def _replace(path: Path, manifest: dict[str, object]) -> None:
    """Write ``path`` so that readers see the old or the new contents, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(path)


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.rename(link)


if __name__ == "__main__":
    sys.stdout.write(f"{prepare()}\n")
