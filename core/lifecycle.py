"""Child processes that die with their parent, and ports that say who holds them.

Every long-running child driftloop starts (the BentoML server and its workers, a refinement,
Prometheus, the Evidently UI) must exit when the process that started it dies, even by kill -9 or
the OOM killer: an orphaned worker keeps serving a port, unmanaged, and the next start fails on it.
Linux's `PR_SET_PDEATHSIG` makes the kernel signal the child the moment its parent dies, with no
polling; `die_with_parent` sets it for a child about to exec, `die_with_parent_now` for the calling
process itself (a BentoML worker, forked by BentoML's arbiter, not by us).

A port already in use is answered with one line naming the port and what holds it
(`ensure_port_free`), found in /proc: the listening socket's inode, then the process owning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from core.errors import DriftloopError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _prctl():
    """libc's prctl, resolved once (find_library runs ldconfig); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when the thread that started it dies; None off Linux.

    Why a preexec_fn is safe here, though the Python docs warn about it in threaded parents: the
    forked child holds only the forking thread, so a preexec_fn that takes a lock another thread
    held at fork time deadlocks. This one takes none: libc and `prctl` are resolved here, in the
    parent, and the child makes two syscalls (prctl, getppid) and maybe a kill; nothing is imported,
    allocated or logged between fork and exec. The signal follows the *thread* that forked, so the
    Popen must be made by a thread that outlives the child (a main thread, or one that waits on it).
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: the signal will never come
            os.kill(os.getpid(), sig)

    return preexec


def die_with_parent_now(sig: int = signal.SIGTERM) -> bool:
    """Make the calling process receive `sig` when its parent dies (False off Linux). For a process we
    did not fork ourselves, such as a BentoML worker, whose parent is BentoML's arbiter."""
    prctl = _prctl()
    if prctl is None:
        return False
    parent = os.getppid()  # may be 1 legitimately: a Bento container's entrypoint execs the arbiter as PID 1
    prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect: the signal will never come
        os.kill(os.getpid(), sig)
    return True


# --------------------------------------------------------------------------- ports


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on TCP `port` (any address, IPv4 or IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> str | None:
    """`pid N (command line)` of the process listening on `port`, or None if it cannot be seen (none,
    or another user's process: its file descriptors are not readable)."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {proc.name} ({cmdline[:160]})"
        except OSError:
            continue
    return "another user's process"


def ensure_port_free(port: int, host: str = "127.0.0.1", what: str = "the server") -> None:
    """Raise DriftloopError, one line naming the port and its holder, if `host:port` cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT leftovers are no conflict
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise DriftloopError(f"cannot bind {host}:{port} for {what}: {err.strerror}") from None
            holder = port_holder(port)
            raise DriftloopError(f"port {port} is in use{f' by {holder}' if holder else ''}: stop it or choose "
                                 f"another port for {what}") from None
