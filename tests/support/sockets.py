"""Which processes live and which sockets they hold, read from /proc (no psutil needed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import NamedTuple


class Listener(NamedTuple):
    proto: str  # "tcp", "tcp6", "udp" or "udp6"
    host: str
    port: int
    inode: int


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_group_pids(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat_fields(entry)
        if fields is not None and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid`: a head started with `start_new_session` and every process it started
    (actors get their own process group, not their own session)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat_fields(entry)
        if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry))
    return out


def stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to every process of `proc`'s session (it leads one: `start_new_session`), waiting for
    them to go: the Ray a test started is stopped, and no other (never `ray stop`)."""
    sid = proc.pid
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_pids(sid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
    proc.wait(10)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (free when asked: a Ray head's fixed ports)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def descendant_pids(root: int) -> list[int]:
    """`root` and every live process below it (by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat_fields(entry)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _socket_inodes(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _decode_proc_address(hex_addr: str) -> tuple[str, int]:
    host_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(host_hex)
    # /proc/net/* prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port_hex, 16)


class InetSocket(NamedTuple):
    proto: str  # "tcp", "tcp6", "udp" or "udp6"
    state: str  # /proc/net state code: "0A" LISTEN, "01" ESTABLISHED, …
    local: tuple[str, int]
    remote: tuple[str, int]
    inode: int


ESTABLISHED, LISTEN, UDP_BOUND = "01", "0A", "07"  # socket states as /proc/net/{tcp,udp} write them


def inet_sockets(pids: list[int]) -> list[InetSocket]:
    """Every TCP and UDP socket (any state) that one of `pids` holds open."""
    inodes = _socket_inodes(pids)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/self/net/{proto}", encoding="ascii") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[9]) in inodes:
                found.append(InetSocket(proto, fields[3], _decode_proc_address(fields[1]),
                                        _decode_proc_address(fields[2]), int(fields[9])))
    return found


def listening_sockets(pids: list[int]) -> list[Listener]:
    """TCP LISTEN and bound UDP sockets owned by any of `pids`."""
    return [Listener(s.proto, *s.local, s.inode) for s in inet_sockets(pids)
            if s.state == (LISTEN if s.proto.startswith("tcp") else UDP_BOUND)]


def start_time(pid: int) -> str | None:
    """A live process's start time (tells it from a reused pid); None when it is gone or a zombie."""
    fields = _stat_fields(str(pid))
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


def alive(pids: dict[int, str | None]) -> list[int]:
    """Those of `pids` (pid → start time, as `start_time` read it) that still run."""
    return [pid for pid, started in pids.items() if started is not None and start_time(pid) == started]
