"""``ramctl``'s image and job commands: ``save``, ``load``, ``images``, ``rm-image``, ``jobs``.

Images live in the daemon's ``state-dir`` and are named as ``ram-save``'s ``{"file": NAME}``
(the parser checks the name first). ``save`` refuses to replace an existing image unless
``--force`` (as ``qemu-img`` and ``virsh`` refuse to overwrite without being told): it asks
``query-images`` first, so an image that another client saves under the same name between
that answer and this save is replaced (the daemon's rename is atomic: never a part).

``save`` and ``load`` follow their job (a progress bar on a terminal), dismiss it once it
concluded and print what was done; ``--no-wait`` prints the job id instead.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import datetime

from ramd.api import models as m
from ramd.sizes import format_size
from ramd_client.cli_output import EXIT_FAILED, EXIT_OK, Failure, emit, emit_json, table
from ramd_client.cli_parser import UsageError
from ramd_client.cli_progress import WITH_TOTAL as _BAR_WITH_TOTAL
from ramd_client.cli_progress import progress_bar
from ramd_client.client import AsyncClient

__all__ = ["JOB_POLL", "cmd_images", "cmd_jobs", "cmd_load", "cmd_rm_image", "cmd_save"]

#: Seconds between two ``query-jobs`` while ``save``/``load`` wait for their job.
JOB_POLL = 0.2


def _mtime(entry: m.ImageEntry) -> str:
    return datetime.fromtimestamp(entry.mtime).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _data_text(entry: m.ImageEntry) -> str:
    """How much the image holds, and takes on disk (zero pages are holes)."""
    data = "?" if entry.data_bytes is None else format_size(entry.data_bytes)
    return f"{data}, {format_size(entry.disk_size)} on disk"


def _blocks_text(entry: m.ImageEntry) -> str:
    if entry.blocks is None:
        return f"unreadable: {entry.error}"
    count = len(entry.blocks)
    return f"{count} block{'s' if count != 1 else ''} ({', '.join(entry.blocks)})"


async def _image(client: AsyncClient, name: str) -> m.ImageEntry | None:
    return next((i for i in await client.query_images() if i.name == name), None)


async def _wait_job(client: AsyncClient, args: argparse.Namespace, job_id: str) -> m.JobInfo:
    """Follow job ``job_id`` until it concludes (a progress bar on a terminal), dismiss it,
    and return it; a job that failed raises :class:`Failure` with its error."""
    with progress_bar(None, f"{args.command} {args.name}") as bar:
        while True:
            job = next((j for j in await client.query_jobs() if j.id == job_id), None)
            if job is None:
                raise Failure(EXIT_FAILED, f"job {job_id} was dismissed by another client")
            if job.total_progress and bar.total != job.total_progress:
                bar.total = job.total_progress
                bar.bar_format = _BAR_WITH_TOTAL
            bar.update(job.current_progress - bar.n)
            if job.status == "concluded":
                break
            await asyncio.sleep(JOB_POLL)
    await client.job_dismiss(job_id)
    if job.error is not None:
        raise Failure(EXIT_FAILED, f"{job.type} {args.name} ({job_id}): {job.error}", "JobFailed")
    return job


def _started(args: argparse.Namespace, job_id: str) -> int:
    emit_json({"job-id": job_id}) if args.json else emit(job_id)
    return EXIT_OK


async def cmd_save(client: AsyncClient, args: argparse.Namespace) -> int:
    if not args.force:
        old = await _image(client, args.name)
        if old is not None:
            raise Failure(
                EXIT_FAILED,
                f"image '{args.name}' exists ({_blocks_text(old)}, {_data_text(old)}, "
                f"saved {_mtime(old)}): use --force to replace it, or `ramctl rm-image "
                f"{args.name}`",
                "ImageExists",
            )
    start = time.monotonic()
    job_id = await client.ram_save(args.name, blocks=args.blocks or None)
    if args.no_wait:
        return _started(args, job_id)
    job = await _wait_job(client, args, job_id)
    seconds = time.monotonic() - start
    image = await _image(client, args.name)
    if args.json:
        doc = job.model_dump(mode="json", by_alias=True)
        if image is not None:
            doc["image"] = image.model_dump(mode="json", by_alias=True)
        emit_json(doc)
    elif image is None:  # removed or replaced meanwhile by another client
        emit(f"saved {format_size(job.total_progress)} to image '{args.name}' in {seconds:.1f} s")
    else:
        emit(
            f"saved {_blocks_text(image)}, {_data_text(image)}, to image '{args.name}' "
            f"in the daemon's state-dir in {seconds:.1f} s"
        )
    return EXIT_OK


async def cmd_load(client: AsyncClient, args: argparse.Namespace) -> int:
    start = time.monotonic()
    job_id = await client.ram_load(args.name)
    if args.no_wait:
        return _started(args, job_id)
    job = await _wait_job(client, args, job_id)
    if args.json:
        emit_json(job.model_dump(mode="json", by_alias=True))
    else:
        emit(
            f"loaded image '{args.name}' ({format_size(job.total_progress)} checked and "
            f"copied) in {time.monotonic() - start:.1f} s"
        )
    return EXIT_OK


async def cmd_images(client: AsyncClient, args: argparse.Namespace) -> int:
    images = await client.query_images()
    if args.json:
        emit_json([i.model_dump(mode="json", by_alias=True) for i in images])
    elif args.name:
        if images:
            emit("\n".join(i.name for i in images))
    else:
        rows = [
            (
                i.name,
                "-" if i.data_bytes is None else format_size(i.data_bytes),
                format_size(i.disk_size),
                _mtime(i),
                "-" if i.blocks is None else ",".join(i.blocks),
                i.error or "",
            )
            for i in images
        ]
        emit(table(("NAME", "DATA", "ON-DISK", "MODIFIED", "BLOCKS", "ERROR"), rows))
    return EXIT_OK


async def cmd_rm_image(client: AsyncClient, args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(args.names))
    for name in names:
        await client.image_remove(name)
        if not args.json:
            emit(f"removed image '{name}'")
    if args.json:
        emit_json({"removed": names})
    return EXIT_OK


async def cmd_jobs(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.action != "list":
        if args.job is None:
            raise UsageError("", f"jobs {args.action}: JOB expected (see `ramctl jobs`)")
        if args.action == "cancel":
            await client.job_cancel(args.job)
            text = f"asked job {args.job} to stop (`ramctl jobs` shows when it concluded)"
        else:
            await client.job_dismiss(args.job)
            text = f"dismissed job {args.job}"
        emit_json({"id": args.job, args.action: True}) if args.json else emit(text)
        return EXIT_OK
    if args.job is not None:
        raise UsageError("", f"jobs: unexpected {args.job!r} (ACTION: cancel or dismiss)")
    jobs = await client.query_jobs()
    if args.json:
        emit_json([j.model_dump(mode="json", by_alias=True) for j in jobs])
    elif args.name:
        if jobs:
            emit("\n".join(j.id for j in jobs))
    else:
        rows = [
            (
                j.id,
                j.type,
                j.status,
                f"{format_size(j.current_progress)}/{format_size(j.total_progress)}",
                j.error or "",
            )
            for j in jobs
        ]
        emit(table(("ID", "TYPE", "STATUS", "PROGRESS", "ERROR"), rows))
    return EXIT_OK
