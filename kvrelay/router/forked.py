"""Bytes computed in a forked child, so a large snapshot never holds the event loop of the
process that keeps the index (a router, or a relay's snapshot process).

A snapshot of a worker holding hundreds of thousands of blocks takes a good part of a second of
CPU to build and encode. In a thread it would still hold the GIL for long stretches (sorting and
encoding are single C calls) and stall publishing; on the loop it would stall it outright. A
forked child sees the index exactly as it was at the fork, at the cost of copying page tables,
builds and encodes on another core, and writes the bytes to a pipe the loop reads as they come.
This is how Redis writes its snapshots (BGSAVE).

The child runs only the given function and `os._exit`s: no event loop, no logging, no I/O but
the pipe, garbage collection off (it would touch every object and copy every page).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Callable

_CHUNK = 1 << 20


class ChildFailed(RuntimeError):
    """The child exited without delivering its bytes."""


def available() -> bool:
    """Whether this platform can fork (Linux and other POSIX systems)."""
    return hasattr(os, "fork")


async def in_child(build: Callable[[], bytes]) -> tuple[bytes, float]:
    """`build()`'s bytes, computed in a forked child; and the child's CPU seconds.
    OSError when the fork itself fails (no memory, too many processes): the caller may try
    another way."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # pragma: no cover - the child (its exit status is checked by the parent)
        _child(build, read_fd, write_fd)
    os.close(write_fd)
    started = time.monotonic()
    try:
        data = await _read_all(read_fd)
    except BaseException:  # cancelled (the relay stopping) or the pipe failed
        _kill(pid)
        raise
    finally:
        os.close(read_fd)
    status, cpu = await _reap(pid)
    if status != 0:
        raise ChildFailed(f"the snapshot process exited with status {status} after "
                          f"{time.monotonic() - started:.1f} s")
    return data, cpu


def _child(build: Callable[[], bytes], read_fd: int, write_fd: int) -> None:  # pragma: no cover
    status = 1
    try:
        gc.disable()
        os.close(read_fd)
        signal.set_wakeup_fd(-1)  # the parent's loop owns the wake-up socket
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        view = memoryview(build())
        while view:
            view = view[os.write(write_fd, view[:_CHUNK]):]
        status = 0
    finally:
        os._exit(status)


async def _read_all(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    parts: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            while True:
                part = os.read(fd, _CHUNK)
                if not part:
                    if not done.done():
                        done.set_result(None)
                    return
                parts.append(part)
        except BlockingIOError:
            return
        except OSError as exc:
            if not done.done():
                done.set_exception(exc)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(parts)


async def _reap(pid: int) -> tuple[int, float]:
    """The child's exit status (0: success) and CPU seconds. It has closed the pipe, so it is
    exiting; poll without blocking the loop. A cancelled caller still reaps it."""
    delay = 0.001
    while True:
        done = _poll(pid)
        if done is not None:
            return done
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            _kill(pid)
            raise
        delay = min(delay * 2, 0.05)


def _poll(pid: int) -> tuple[int, float] | None:
    """The exited child's status and CPU seconds; None while it runs (never blocks)."""
    try:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere: its status is unknown
        return -1, 0.0
    if waited != pid:
        return None
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def _kill(pid: int) -> None:
    """End the child now and reap it (a killed process exits at once)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
