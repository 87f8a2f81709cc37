"""Reading items: ids, row numbers, and bad rows marked with reason codes (never dropped)."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.bad_files import corrupt_second_row_group

from common.errors import InputError
from pipelines.embed.config import InputConfig
from pipelines.input import parquet_io
from pipelines.input.parquet_io import StorageReadError
from pipelines.input.plan import make_plan
from pipelines.input.reading import read_item


def test_parquet_rows_ids_and_rejects(tmp_path):
    pq.write_table(pa.table({"text": ["ok", None, "  \n", "fine"], "lang": ["en", "de", "fr", "ja"]}),
                   tmp_path / "p.parquet", row_group_size=2)
    cfg = InputConfig(paths=[str(tmp_path / "p.parquet")], passthrough_columns=["lang"], rows_per_item=2)
    items = make_plan(cfg).items
    t = pa.concat_tables([read_item(i, cfg) for i in items])
    assert t.column("id").to_pylist() == ["p.parquet:0", "p.parquet:1", "p.parquet:2", "p.parquet:3"]
    assert t.column("_row").to_pylist() == [0, 1, 2, 3]
    assert t.column("_reject").to_pylist() == [None, "null_text", "empty_text", None]
    assert t.column("text").to_pylist() == ["ok", None, None, "fine"]
    assert t.column("lang").to_pylist() == ["en", "de", "fr", "ja"]
    assert set(t.column("_item").to_pylist()) == {i.item_id for i in items}


def write_same_name_in_two_folders(tmp_path, fmt, rows):
    """x/2025/part-0.<fmt> and x/2026/part-0.<fmt>, `rows` texts each; returns one glob per folder."""
    for year in ("2025", "2026"):
        folder = tmp_path / "x" / year
        folder.mkdir(parents=True)
        texts = [f"{year} text {i}" for i in range(rows)]
        if fmt == "parquet":
            pq.write_table(pa.table({"text": texts}), folder / "part-0.parquet")
        else:
            (folder / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [str(tmp_path / "x" / year / f"*.{fmt}") for year in ("2025", "2026")]


def generated_ids(cfg):
    return [i for item in make_plan(cfg).items for i in read_item(item, cfg).column("id").to_pylist()]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_generated_ids_are_unique_across_globs_whose_files_share_names(tmp_path, fmt):
    cfg = InputConfig(paths=write_same_name_in_two_folders(tmp_path, fmt, 4), format=fmt)
    ids = generated_ids(cfg)
    assert len(ids) == 8 and len(set(ids)) == 8, ids
    assert ids[0] == f"2025/part-0.{fmt}:0" and ids[-1] == f"2026/part-0.{fmt}:3"
    assert generated_ids(cfg) == ids


def test_generated_ids_of_one_glob_are_relative_to_its_folder(tmp_path):
    cfg = InputConfig(paths=write_same_name_in_two_folders(tmp_path, "parquet", 2)[:1])
    assert generated_ids(cfg) == ["part-0.parquet:0", "part-0.parquet:1"]


def test_parquet_null_ids_are_rejected(tmp_path):
    pq.write_table(pa.table({"doc_id": [7, None], "text": ["a", "b"]}), tmp_path / "p.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "p.parquet")], id_column="doc_id")
    t = read_item(make_plan(cfg).items[0], cfg)
    assert t.column("id").to_pylist() == ["7", None]
    assert t.column("_reject").to_pylist() == [None, "null_id"]


def test_jsonl_bad_lines_get_reason_codes(tmp_path):
    lines = [json.dumps({"id": "a", "text": "good"}).encode(), b"", b"{not json",
             json.dumps([1, 2]).encode(), json.dumps({"id": "d", "text": 5}).encode(),
             json.dumps({"id": "e"}).encode(), json.dumps({"id": "f", "text": None}).encode(),
             b'{"id": "g", "text": "\xff\xfe"}', json.dumps({"text": "no id"}).encode(),
             json.dumps({"id": 9, "text": ""}).encode()]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = InputConfig(paths=[str(tmp_path / "c.jsonl")], format="jsonl", id_column="id")
    t = read_item(make_plan(cfg).items[0], cfg)
    assert t.column("_reject").to_pylist() == [None, "invalid_json", "not_an_object", "text_not_string",
                                               "missing_text", "null_text", "invalid_utf8", "null_id",
                                               "empty_text"]
    assert t.column("_row").to_pylist() == list(range(9))
    assert t.column("_item_rows").to_pylist() == [9] * 9
    assert t.column("id").to_pylist()[:1] == ["a"] and t.column("id").to_pylist()[-1] == "9"


def test_undecodable_row_groups_reject_their_rows_with_ids_or_fail(tmp_path):
    corrupt_second_row_group(tmp_path / "c.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "c.parquet")], id_column="doc_id", rows_per_item=4)
    first, second = make_plan(cfg).items
    assert read_item(first, cfg).column("_reject").to_pylist() == [None] * 4
    t = read_item(second, cfg)
    assert t.column("_reject").to_pylist() == ["unreadable_row_group"] * 4
    assert t.column("id").to_pylist() == ["d4", "d5", "d6", "d7"] and t.column("_row").to_pylist() == [4, 5, 6, 7]
    assert t.column("text").null_count == 4
    strict = cfg.model_copy(update={"on_bad_file": "fail"})
    with pytest.raises(InputError, match=r"c\.parquet: cannot decode row groups 1\.\.1"):
        read_item(second, strict)


class DroppingFile(io.BytesIO):
    """A file whose every read fails, as a store dropping connections would."""

    def read(self, *args):
        raise ConnectionResetError("connection reset by peer")


def test_store_errors_are_never_taken_for_corrupt_data(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "p.parquet")])
    item = make_plan(cfg).items[0]
    data = (tmp_path / "p.parquet").read_bytes()
    monkeypatch.setattr(parquet_io, "open_input", lambda url, opts: DroppingFile(data))
    with pytest.raises(StorageReadError, match="connection reset by peer"):
        read_item(item, cfg)
    with pytest.raises(StorageReadError, match="connection reset by peer"):
        make_plan(cfg)
