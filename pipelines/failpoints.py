"""Failpoints for crash tests, inert unless an environment variable names them (as databases do).

    EMBEDRANK_FAILPOINTS=before_piece_write,after_commit_write   names to fire
    EMBEDRANK_FAILPOINT_DIR=/some/dir                             fire each name once only

A firing failpoint kills its process at once (`os._exit(137)`, like SIGKILL:
no cleanup, no finally blocks). With EMBEDRANK_FAILPOINT_DIR set, a marker file
there makes each name fire only the first time, so a retried task or a rerun
gets through. The points:

- before_piece_write   write task, before a piece file is written
- after_piece_write    write task, after its pieces are written, before it reports them
- before_commit_write  driver, before a commit record is written
- after_commit_write   driver, after a commit record is written, before the next piece is read
"""

from __future__ import annotations

import os

POINTS = ("before_piece_write", "after_piece_write", "before_commit_write", "after_commit_write")


def hit(name: str) -> None:
    names = os.environ.get("EMBEDRANK_FAILPOINTS")
    if not names or name not in names.split(","):
        return
    marker_dir = os.environ.get("EMBEDRANK_FAILPOINT_DIR")
    if marker_dir:
        try:
            os.close(os.open(os.path.join(marker_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os._exit(137)
