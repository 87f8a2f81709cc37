"""JSONL files cut into byte ranges: every line read exactly once, in order, whatever the cut; ids deterministic."""

import gzip
import io
import itertools
import json

import pyarrow as pa
import pytest

from pipelines.config import MIB
from pipelines.embed.config import InputConfig
from pipelines.input.plan import WorkItem, jsonl_ranges, make_plan
from pipelines.input.reading import jsonl_bytes, jsonl_lines, read_item

# A range boundary can fall inside a line, exactly at a line start, on a `\n`, inside a CRLF, inside a
# multi-byte UTF-8 character (2, 3 and 4 bytes), among empty and blank lines; the file has no trailing newline.
AWKWARD = ('{"text": "caf\u00e9 \u65e5\u672c"}\r\n\n\n{"text": "b"}\n  \n{"text": "\U0001f642 x"}\n'
           '{"text": "d"}\n\n{"text": "e"}').encode()


def item(start=None, end=None):
    return WorkItem("i", "u", "r", "jsonl", 0, None, None, 0, byte_start=start, byte_end=end)


def lines_of(data, bounds):
    """The (offset, line) pairs read by the items that `bounds` (0, …, len(data)) cut `data` into, in order."""
    return [line for start, end in itertools.pairwise(bounds)
            for line in jsonl_lines(*jsonl_bytes(io.BytesIO(data), item(start, end)))]


@pytest.mark.parametrize("data", [AWKWARD, AWKWARD + b"\n", AWKWARD.replace(b"\r\n", b"\n") + b"\r\n", b"",
                                  b"\n\n\n", b'{"text": "one line, no newline"}'])
def test_every_line_is_read_exactly_once_at_every_cut(data):
    whole = jsonl_lines(*jsonl_bytes(io.BytesIO(data), item()))
    assert [data[o:].split(b"\n")[0] for o, _ in whole] == [line for _, line in whole]  # offsets point at lines
    n = len(data)
    for cuts in itertools.chain(([c] for c in range(n + 1)), itertools.combinations(range(n + 1), 2)):
        assert lines_of(data, [0, *cuts, n]) == whole, cuts
    assert lines_of(data, [0, *range(1, n), n] if n else [0, 0]) == whole  # every range one byte


def test_ranges_are_equal_cover_the_file_and_need_only_its_size():
    assert jsonl_ranges(10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert jsonl_ranges(9, 9) == [(0, 9)] and jsonl_ranges(0, 5) == [(0, 0)]
    ranges = jsonl_ranges(10 * MIB + 1, MIB)
    assert len(ranges) == 11 and ranges[0][0] == 0 and ranges[-1][1] == 10 * MIB + 1
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) <= MIB and max(sizes) - min(sizes) <= 1


def write_corpus(path, rows, bad=()):
    lines = [json.dumps({"doc_id": f"d{i}", "text": f"text {i} " + "\u00e9" * (i % 7)}).encode() for i in range(rows)]
    for i in bad:
        lines[i] = b"{broken"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def cfg_for(path, item_bytes, **extra):
    return InputConfig(paths=[str(path)], format="jsonl", jsonl_item_mb=item_bytes / MIB, **extra)


def test_a_big_file_is_many_items_whose_union_is_the_file(tmp_path):
    write_corpus(tmp_path / "a.jsonl", 100)
    whole = read_item(make_plan(cfg_for(tmp_path / "a.jsonl", 10 ** 9, id_column="doc_id")).items[0],
                      cfg_for(tmp_path / "a.jsonl", 10 ** 9, id_column="doc_id"))
    cfg = cfg_for(tmp_path / "a.jsonl", 500, id_column="doc_id")
    plan = make_plan(cfg)
    assert len(plan.items) >= 6 and plan.unknown_row_items == len(plan.items)
    assert [i.byte_range for i in plan.items] == jsonl_ranges((tmp_path / "a.jsonl").stat().st_size, 500)
    tables = [read_item(i, cfg) for i in plan.items]
    assert all(t.num_rows for t in tables)
    for i, t in zip(plan.items, tables):  # rows count within their item, from 0
        assert t.column("_row").to_pylist() == list(range(t.num_rows))
        assert set(t.column("_item").to_pylist()) == {i.item_id}
    cut = pa.concat_tables(tables)
    assert cut.column("id").to_pylist() == whole.column("id").to_pylist() == [f"d{i}" for i in range(100)]
    assert cut.column("text").to_pylist() == whole.column("text").to_pylist()


def test_item_ids_and_generated_row_ids_are_deterministic_and_findable(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = write_corpus(path, 60, bad=[7, 33])
    cfg = cfg_for(path, 400)
    first, second = make_plan(cfg), make_plan(cfg)
    assert [i.to_dict() for i in first.items] == [i.to_dict() for i in second.items]
    assert len({i.item_id for i in first.items}) == len(first.items) > 3
    ids = [x for i in first.items for x in read_item(i, cfg).column("id").to_pylist()]
    assert ids == [x for i in second.items for x in read_item(i, cfg).column("id").to_pylist()]
    assert len(set(ids)) == 60
    data = path.read_bytes()
    for k, row_id in enumerate(ids):  # `<path>@<byte offset>`: the line is found at that offset
        rel, offset = row_id.rsplit("@", 1)
        assert rel == "a.jsonl" and data[int(offset):].split(b"\n")[0] == lines[k]
    # a bad line is rejected where it is: its item, its row in the item, its id (the byte offset)
    rejected = [(t.column("_item")[r].as_py(), t.column("_row")[r].as_py(), t.column("id")[r].as_py())
                for t in (read_item(i, cfg) for i in first.items)
                for r, why in enumerate(t.column("_reject").to_pylist()) if why == "invalid_json"]
    assert [data[int(x.rsplit("@", 1)[1]):].split(b"\n")[0] for _, _, x in rejected] == [b"{broken"] * 2
    by_item = {i.item_id: i for i in first.items}
    for item_id, row, _ in rejected:  # row = the line's index among its item's non-blank lines
        start, end = by_item[item_id].byte_range
        owned = jsonl_lines(*jsonl_bytes(io.BytesIO(data), by_item[item_id]))
        assert owned[row][1] == b"{broken" and start <= owned[row][0] < end


def test_a_file_no_larger_than_the_setting_is_one_item_read_as_before(tmp_path):
    path = tmp_path / "a.jsonl"
    write_corpus(path, 5)
    cfg = cfg_for(path, path.stat().st_size)
    (only,) = make_plan(cfg).items
    assert only.byte_range is None
    assert read_item(only, cfg).column("id").to_pylist() == [f"a.jsonl:{i}" for i in range(5)]
    assert len(make_plan(cfg_for(path, path.stat().st_size - 1)).items) == 2


def test_compressed_jsonl_is_never_cut(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000, mtime=0))
    (only,) = make_plan(cfg_for(tmp_path / "a.jsonl.gz", 64)).items
    assert only.byte_range is None


def test_changing_the_cut_changes_the_fingerprint_only_where_it_changes_ids():
    generated = InputConfig(paths=["x"], format="jsonl")
    assert generated.row_settings()["jsonl_item_mb"] == 64
    assert "jsonl_item_mb" not in InputConfig(paths=["x"], format="jsonl", id_column="id").row_settings()
    assert "jsonl_item_mb" not in InputConfig(paths=["x"]).row_settings()
