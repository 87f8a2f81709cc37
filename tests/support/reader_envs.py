"""Virtual environments of their own for table readers whose pins clash with the project's.

Daft 0.7.26 pins pyarrow < 26 while the project runs pyarrow 26, and the newest Daft that accepts pyarrow 26 (0.6.14)
cannot decode the output's BYTE_STREAM_SPLIT vector pages. So the Daft reader test runs Daft in a venv of its own
(`.reader-envs/daft`, git-ignored, built once and reused), as a user of Daft would, and compares what it reads with
the committed rows in the project's environment.

    python tests/support/reader_envs.py      # build (make test does it before pytest: not counted in the suite)
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import venv

REPO = pathlib.Path(__file__).resolve().parents[2]
ROOT = REPO / ".reader-envs"
DAFT = ["daft==0.7.26", "pyiceberg[sql-sqlite]==0.12.0"]


def _python(env: pathlib.Path) -> pathlib.Path:
    return env / "bin" / "python"


def daft_python() -> tuple[pathlib.Path | None, str]:
    """The interpreter of the Daft environment, built on first use; (None, why) where it cannot be installed
    (no package registry reachable)."""
    env = ROOT / "daft"
    stamp = env / (".installed-" + "-".join(DAFT).replace("[", "_").replace("]", "_"))
    if stamp.exists():
        return _python(env), ""
    venv.EnvBuilder(clear=True, with_pip=True).create(env)
    proc = subprocess.run([str(_python(env)), "-m", "pip", "install", "--quiet", *DAFT],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return None, f"pip install {' '.join(DAFT)} failed: {proc.stderr.strip().splitlines()[-1:]}"
    stamp.touch()
    return _python(env), ""


if __name__ == "__main__":
    python, why = daft_python()
    print(f"daft reader environment: {python or why}")
    sys.exit(0 if python else 1)
