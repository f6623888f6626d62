"""Process and port helpers shared by the services (no pytest here)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import socket

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when pytest dies, so no service outlives a crashed run."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def proc_children(ppid: int) -> list[int]:
    """PIDs whose parent is ``ppid``, read from /proc (no pgrep needed)."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the last ')' (the command name may hold spaces or parentheses).
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 1 and int(rest[1]) == ppid and rest[0] != b"Z":
            out.append(int(entry))
    return sorted(out)


def which(name: str) -> str | None:
    """shutil.which, also searching the sbin folders (where php-fpm8.2 and rabbitmq-server live)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


__all__ = [
    "PR_SET_PDEATHSIG",
    "die_with_parent",
    "free_loopback_port",
    "is_loopback",
    "proc_children",
    "tcp_port_open",
    "which",
]
