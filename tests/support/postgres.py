"""A private PostgreSQL server for the tests: the database of an Iceberg SQL catalog server.

`PostgresServer` runs Debian's PostgreSQL binaries (`/usr/lib/postgresql/<major>/bin`, or `initdb` on PATH): a
fresh cluster in a temp folder (trust authentication, one superuser `embedrank`), listening on 127.0.0.1 only at
a free port, its socket in that folder. PostgreSQL refuses to run as root: as root, every command runs as the
`postgres` system user (`runuser -u postgres --`), which owns the folder. `stop()` stops only this cluster
(`pg_ctl stop` on its own data folder) and removes the folder.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

USER = "embedrank"


def find_bin_dir() -> str | None:
    """The folder of `initdb` and `pg_ctl` (the newest Debian major version first), or None."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.path.exists(f"{folder}/initdb") and os.path.exists(f"{folder}/pg_ctl"):
            return folder
    found = shutil.which("initdb")
    return os.path.dirname(found) if found and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        self.folder = tempfile.mkdtemp(prefix="embedrank-pg-")
        self.data = os.path.join(self.folder, "data")
        self.port = 0
        self.started = False

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, check=True)

    def start(self) -> "PostgresServer":
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(f"{self.bin_dir}/initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        self.port = _free_port()
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run(f"{self.bin_dir}/pg_ctl", "-D", self.data, "-o", opts, "-l", f"{self.folder}/log", "-w",
                  "-t", "60", "start")
        self.started = True
        return self

    def uri(self, database: str = "postgres") -> str:
        """SQLAlchemy URI of `database` on this server."""
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.started:
            self._run(f"{self.bin_dir}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
            self.started = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
