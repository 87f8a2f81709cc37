"""One writer per output, fenced: a lease with an owner, a heartbeat and an epoch, written with conditional writes.

Epochs: each acquisition of the lock gets a strictly increasing integer, written with the lock's own
compare-and-swap, so two holders never share one. The lock object is never deleted: a release marks it free
and keeps its epoch, so the next acquisition counts on from it. Every file a holder creates carries its epoch
in its name (`epoch_tag`), and every record and control file it writes carries it inside: the store, not a
check made beforehand, refuses what a holder that lost its lease writes late (`pipelines.output.control`).

Acquire: the lock is created with `If-None-Match: *` (local disk: an exclusive hard link), or a released one
taken with `If-Match` on its ETag, so of two jobs that start together exactly one gets it. A job that finds
a lock held:

- by a process of this machine (same boot id and pid namespace) that is alive (pid and start time) is
  refused at once: a live owner is never taken over, whatever either job's `run.lock_stale_s`;
- by a process of this machine that is gone: takes it over at once;
- elsewhere (another machine, container or pid namespace: liveness cannot be seen from here), whose
  heartbeat timestamp looks fresh (younger than the longer of its own `stale_after_s` and the one the owner
  recorded) is refused at once, naming the owner;
- elsewhere, whose heartbeat timestamp looks stale, watches the lock object for that longer stale time of
  its own clock (monotonic, suspend included). The timestamp is only a hint (it comes from another host's clock); what
  decides is the lock's ETag: a live owner rewrites the lock every fifth of `stale_after_s`, so a lock that
  did not change for that long belongs to a dead or cut-off driver. If it changed, the job is refused; if
  not, it takes the lock over with a compare-and-swap (`If-Match` on the ETag it watched), so of two waiting
  jobs only one wins. Skewed clocks can thus only make a job refuse a dead owner's lock until it looks
  stale, or watch a live one before refusing: never take over a live owner's lock.

Heartbeat: every `heartbeat_s` (a fifth of `stale_after_s`, recorded in the lock), a compare-and-swap on the lock as last read, after checking that
it still carries this job's token. A failed swap or a foreign owner marks the lock LOST.

Fencing: before each commit record, delete, index pointer write and `gc` step, the output root calls
`fence(storage)`, which calls `check()` of the lock this process holds on that root (or a folder above it).
`check()` raises `LockLost` (CLI exit status 4) if the lock was lost, or if no heartbeat succeeded for half
of `stale_after_s` (the driver may have been paused: a VM suspend, a long GC pause, a partition) and a
heartbeat made now fails. A driver therefore writes only while its last successful heartbeat is younger than
half of `stale_after_s`, which leaves the other half for the write itself before a waiting job, which waits
the whole `stale_after_s` after the last change it saw, may take over. That check is only an early exit: what
a write already past it when the driver paused may do is bounded by the store (epochs, above).

A store that ignores the conditional headers is refused at acquisition, after a probe
(`Storage.conditional_write_problem`), unless `allow_unconditional` (`run.allow_unconditional_store`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, TextIO

from common.errors import LockLost, OutputError
from pipelines.storage import PreconditionFailed, Storage

LOCK_FILE = "_lock.json"
HEARTBEATS_PER_STALE = 5
"""A holder renews its lock this many times per `stale_after_s`."""
SAFE_FRACTION = 0.5
"""A driver writes only while its last successful heartbeat is younger than this fraction of the stale time."""



def _clock() -> float:
    """This host's elapsed time, suspend included (Linux CLOCK_BOOTTIME; CLOCK_MONOTONIC stops while a machine is
    suspended, and a driver woken from a suspend must see that its heartbeat is old)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


_HELD: dict[tuple[str, str], OutputLock] = {}
_HELD_MUTEX = threading.Lock()


def _key(storage: Storage) -> tuple[str, str]:
    return str(storage.fs.protocol), storage.root


def fence(storage: Storage) -> None:
    """Call before a commit, delete or pointer write under `storage`: raises `LockLost` if the lock this process
    holds on that root (or on a folder above it, as an index root is above its versions) is lost. A process
    that holds no lock there (a reader, `status`, `report`) is not fenced."""
    proto, root = _key(storage)
    with _HELD_MUTEX:
        locks = [lock for (p, r), lock in _HELD.items()
                 if p == proto and (root == r or root.startswith(r.rstrip("/") + "/"))]
    for lock in locks:
        lock.check()


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None


def machine_identity() -> dict[str, str | None]:
    """What tells this machine and pid namespace apart from any other: the kernel's boot id (new at every boot,
    shared by the containers of one kernel) and this process's pid namespace. A hostname is neither: containers
    on host networking and cloned machines share one."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live process from a reused pid), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_liveness(held: dict[str, Any]) -> bool | None:
    """True if the lock's owner is a live process of this machine and pid namespace, False if it is one that is
    gone, None if that cannot be seen from here (another machine or namespace, or a lock written without them)."""
    here = machine_identity()
    if "pid" not in held or None in here.values() or any(held.get(k) != v for k, v in here.items()):
        return None
    start = _process_start(int(held["pid"]))
    return start is not None and start == held.get("pid_start")


def owner_gone(held: dict[str, Any]) -> bool:
    """Whether the lock's owner is known to be dead (a process of this machine that is gone)."""
    return owner_liveness(held) is False


def is_released(held: dict[str, Any]) -> bool:
    return bool(held.get("released"))


def held_epoch(storage: Storage | None) -> int:
    """The epoch of the lock this process holds on `storage`'s root or a folder above it; 0 if it holds none (a
    test writing without a lock, or a graph built with no output: its files are named as of epoch 0, older than
    any lease)."""
    if storage is None:
        return 0
    proto, root = _key(storage)
    with _HELD_MUTEX:
        epochs = [lock.epoch for (p, r), lock in _HELD.items()
                  if p == proto and (root == r or root.startswith(r.rstrip("/") + "/"))]
    return max(epochs, default=0)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        held = json.loads(data)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


class OutputLock:
    def __init__(self, storage: Storage, stale_after_s: float, stream: TextIO | None = None, *,
                 allow_unconditional: bool = False):
        self.storage = storage
        self.stale_after_s = stale_after_s
        self.stream = stream or sys.stderr
        self.allow_unconditional = allow_unconditional
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host} pid {self.pid}"
        self.started = time.time()
        self.machine = machine_identity()
        self.epoch = 0
        """This acquisition's lease epoch (set by `acquire`): greater than every earlier holder's."""
        self._beats = 0
        self._etag: str | None = None
        self._last_ok = float("-inf")
        """Monotonic time at which the last successful write of the lock was sent."""
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _say(self, text: str) -> None:
        print(f"lock: {text}", file=self.stream, flush=True)

    @property
    def heartbeat_s(self) -> float:
        return max(self.stale_after_s / HEARTBEATS_PER_STALE, 0.05)

    def _record(self, released: bool = False) -> bytes:
        self._beats += 1
        return json.dumps({
            "token": self.token, "owner": self.owner, "host": self.host, **self.machine, "pid": self.pid,
            "pid_start": _process_start(self.pid), "started": self.started, "heartbeat": time.time(),
            "beat": self._beats, "epoch": self.epoch, "stale_after_s": self.stale_after_s,
            "heartbeat_s": self.heartbeat_s, **({"released": True} if released else {}),
        }).encode()

    # -- acquire -------------------------------------------------------------------------------------------------

    def _check_store(self) -> None:
        if self.storage.is_local:
            return
        if self.allow_unconditional:
            self._say(f"run.allow_unconditional_store is set: {self.storage.url} is not probed for conditional "
                      "writes, and writers are fenced only as far as the store enforces them")
            return
        problem = self.storage.conditional_write_problem()
        if problem is not None:
            raise OutputError(
                f"{self.storage.describe()}: this store does not enforce conditional writes: {problem}. embedrank "
                "fences writers with If-None-Match / If-Match; without them two drivers can both write the output "
                "and one can delete files the other committed. Use a store that enforces them, or set "
                "run.allow_unconditional_store: true (gc: --allow-unconditional-store) if no second driver can "
                "ever run on this output"
            )

    def acquire(self) -> OutputLock:
        self._check_store()
        for _ in range(20):
            found = self.storage.read_versioned(LOCK_FILE)
            if found is None:
                self.epoch = 1
                sent, data = _clock(), self._record()
                try:
                    self._etag = self.storage.create(LOCK_FILE, data)
                    break
                except PreconditionFailed:
                    found = self.storage.read_versioned(LOCK_FILE)
                    if found is None:
                        continue
            held = _parse(found[0])
            if held.get("token") == self.token:  # our write landed and a retry of that same PUT failed
                self._etag = found[1]
                break
            if is_released(held):
                taken = self._swap(held, found[1])
            else:
                taken = self._take_over(held, found[1])
            if taken is not None:
                sent = taken
                break
        else:
            raise OutputError(f"{self.storage.url}: the lock kept appearing and disappearing; refusing to run")
        self._last_ok = sent
        with _HELD_MUTEX:
            _HELD[_key(self.storage)] = self
        self._thread = threading.Thread(target=self._beat, name="embedrank-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _refuse(self, held: dict[str, Any], detail: str, alive: bool = False) -> OutputError:
        stale_s = max(self.stale_after_s, float(held.get("stale_after_s") or 0))
        then = ("Stop that job first, or wait for it to finish" if alive else
                f"If that job is gone, its lock goes stale after {stale_s:.0f}s (the longer of run.lock_stale_s and "
                "the owner's)")
        return OutputError(f"{self.storage.url} is being written by another job ({held.get('owner')}, {detail}); "
                           f"refusing to run a second writer. {then}")

    def _swap(self, held: dict[str, Any], etag: str) -> float | None:
        """Take the lock as found (released, or judged dead or stale) with `If-Match` on `etag`, one epoch past its
        own; None if it changed meanwhile (the caller reads it again)."""
        self.epoch = int(held.get("epoch", 0)) + 1
        sent, data = _clock(), self._record()
        try:
            self._etag = self.storage.replace(LOCK_FILE, data, etag)
        except PreconditionFailed:
            found = self.storage.read_versioned(LOCK_FILE)
            if found is None or _parse(found[0]).get("token") != self.token:
                return None  # another job was first, or it was released: look again
            self._etag = found[1]
        return sent

    def _take_over(self, held: dict[str, Any], etag: str) -> float | None:
        """Take over a lock held by someone else, or raise; None if it changed meanwhile (look again)."""
        owner = held.get("owner")
        alive = owner_liveness(held)
        if alive:
            raise self._refuse(held, "a live process of this machine; a live owner is never taken over", alive=True)
        if alive is False:
            why = "its process is gone"
        else:
            stale_s = max(self.stale_after_s, float(held.get("stale_after_s") or 0))
            age = time.time() - float(held.get("heartbeat", 0))
            if age < stale_s:
                raise self._refuse(held, f"last heartbeat {age:.0f}s ago")
            self._say(f"{owner}'s last heartbeat is {age:.0f}s old by this host's clock; watching its lock for "
                      f"{stale_s:.0f}s (the longer of run.lock_stale_s and the owner's) before taking it over (a "
                      f"live owner renews it every {float(held.get('heartbeat_s') or stale_s / 5):.1f}s)")
            deadline = _clock() + stale_s
            poll = max(0.05, min(stale_s / 10, 5.0))
            while (now := _clock()) < deadline:
                time.sleep(min(poll, deadline - now))
                found = self.storage.read_versioned(LOCK_FILE)
                if found is None:
                    return None
                if found[1] != etag:
                    if is_released(_parse(found[0])):
                        return None
                    raise self._refuse(_parse(found[0]), "its lock changed while this job watched it")
            why = f"last heartbeat {age:.0f}s ago; its lock did not change for {stale_s:.0f}s"
        self._say(f"taking over a stale lock of {owner} ({why})")
        sent = self._swap(held, etag)
        if sent is None:
            found = self.storage.read_versioned(LOCK_FILE)
            if found is not None and not is_released(_parse(found[0])):
                raise OutputError(f"{self.storage.url}: another job ({_parse(found[0]).get('owner')}) took the lock "
                                  "at the same moment; refusing") from None
        return sent

    # -- heartbeat and fencing -----------------------------------------------------------------------------------

    def _lose(self, why: str) -> None:
        self._lost = why
        self._say(f"LOST: {why}; this job stops before its next commit, delete or pointer write")

    def renew(self, only_if_older_s: float | None = None) -> bool:
        """One heartbeat: a compare-and-swap of the lock, if it still carries this job's token. False if it failed
        (a foreign owner or a failed swap also marks the lock lost; a store error does not)."""
        with self._mutex:
            if self._lost is not None:
                return False
            if only_if_older_s is not None and _clock() - self._last_ok <= only_if_older_s:
                return True
            sent = _clock()
            try:
                found = self.storage.read_versioned(LOCK_FILE)
                if found is None:
                    self._lose("its lock was deleted (another job took it over and finished)")
                    return False
                held = _parse(found[0])
                if held.get("token") != self.token:
                    self._lose(f"{held.get('owner')} took the lock over")
                    return False
                data = self._record()
                try:
                    self._etag = self.storage.replace(LOCK_FILE, data, found[1])
                except PreconditionFailed:
                    again = self.storage.read_versioned(LOCK_FILE)
                    if again is None or again[0] != data:  # else: our swap landed and a retry of it failed
                        now = _parse(again[0]).get("owner") if again else None
                        self._lose(f"the lock changed under its heartbeat ({now or 'deleted'})")
                        return False
                    self._etag = again[1]
                self._last_ok = sent
                return True
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the job; check() decides
                self._say(f"heartbeat failed ({type(exc).__name__}: {exc}); will retry")
                return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.renew()
            if self._lost is not None:
                return

    def check(self) -> None:
        """Raise `LockLost` unless this job still owns the lock with a recent heartbeat (renewed now if it is
        older than half of `stale_after_s`)."""
        limit = self.stale_after_s * SAFE_FRACTION
        if self._lost is None and _clock() - self._last_ok > limit:
            self.renew(only_if_older_s=limit)
        if self._lost is not None:
            raise LockLost(
                f"{self.storage.url}: this job lost its lock ({self._lost}); it stopped before its next commit, "
                "delete or pointer write. Another job owns the output now: what this one committed is kept"
            )
        age = _clock() - self._last_ok
        if age > limit:
            raise LockLost(
                f"{self.storage.url}: no heartbeat of this job's lock succeeded for {age:.0f}s (half of "
                f"run.lock_stale_s={self.stale_after_s:.0f}s); another job may take the output over, so this one "
                "stops before its next commit, delete or pointer write. Rerun to resume"
            )

    @property
    def lost(self) -> str | None:
        """Why the lock was lost, None while it is held."""
        return self._lost

    # -- release -------------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and mark the lock released, only if it is still this job's (`If-Match`). The object
        stays: it carries the epoch the next holder counts on from."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _HELD_MUTEX:
            if _HELD.get(_key(self.storage)) is self:
                del _HELD[_key(self.storage)]
        with self._mutex:
            if self._lost is not None or self._etag is None:
                return
            try:
                try:
                    self.storage.replace(LOCK_FILE, self._record(released=True), self._etag)
                    return
                except PreconditionFailed:
                    pass
                found = self.storage.read_versioned(LOCK_FILE)
                if found is not None and _parse(found[0]).get("token") == self.token and not is_released(
                        _parse(found[0])):
                    self.storage.replace(LOCK_FILE, self._record(released=True), found[1])
            except Exception as exc:  # noqa: BLE001 - a lock left behind goes stale; the job's outcome stands
                self._say(f"could not release the lock ({type(exc).__name__}: {exc}); it goes stale after "
                          f"{self.stale_after_s:.0f}s")

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
