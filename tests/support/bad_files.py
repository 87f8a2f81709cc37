"""Damaged input files for tests of what a job does with bad data."""

import pyarrow as pa
import pyarrow.parquet as pq


def corrupt_second_row_group(path):
    """A Parquet file whose footer reads but whose second row group's text pages do not decompress."""
    texts = [f"text number {i} {'x' * i} " * 20 for i in range(8)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(8)], "text": texts}), path, row_group_size=4,
                   compression="zstd")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)
    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
    data = bytearray(path.read_bytes())
    lo, hi = start + 16, start + chunk.total_compressed_size - 4
    data[lo:hi] = bytes(b ^ 0x5A for b in data[lo:hi])
    path.write_bytes(bytes(data))
