"""Parquet decoded from bytes already in memory, with no Python object left for Arrow's threads to release.

`pq.read_table(io.BytesIO(data))` (or a `pa.BufferReader` over Python `bytes`) leaves the file reader, which
holds the Python object, to be dropped by whichever Arrow pool thread runs the read's last continuation, at
times after `read_table` has returned. If that happens while the interpreter exits, the thread's
`PyGILState_Ensure` ends it with a forced unwind through a C++ destructor, and the process aborts with
"terminate called without an active exception" (exit 134) after doing all its work: `embedrank status` did
so in 2 of 10 runs on a finished output. Copying the bytes into an Arrow-owned buffer first (one memcpy of a
file already in memory) leaves nothing of Python's for a pool thread to release.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq


def arrow_owned(data: bytes) -> pa.Buffer:
    """`data` copied into a buffer that Arrow allocated (its release needs no GIL)."""
    sink = pa.BufferOutputStream()
    sink.write(data)
    return sink.getvalue()


def read_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """The whole Parquet file in `data` (`columns`: only those)."""
    return pq.read_table(pa.BufferReader(arrow_owned(data)), columns=columns)


def parquet_file(data: bytes) -> pq.ParquetFile:
    """A `ParquetFile` over the bytes in `data`, for footer and row-group reads."""
    return pq.ParquetFile(pa.BufferReader(arrow_owned(data)))
