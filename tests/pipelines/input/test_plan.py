"""Planning: deterministic items, row-group splits, clear errors for missing files and columns."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import InputError
from pipelines.embed.config import InputConfig
from pipelines.input.plan import make_plan, relative_to_common_prefix
from pipelines.storage import InputFile


def write_parquet(path, rows, row_group_size, **extra):
    table = pa.table({"doc_id": [f"d{i}" for i in range(rows)], "text": [f"text {i}" for i in range(rows)],
                      **extra})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_plan_is_deterministic_and_splits_at_row_groups(tmp_path):
    write_parquet(tmp_path / "b.parquet", 1000, 100)
    write_parquet(tmp_path / "a.parquet", 50, 100)
    cfg = InputConfig(paths=[str(tmp_path / "*.parquet")], rows_per_item=300)
    plan = make_plan(cfg)
    again = make_plan(cfg)
    assert [i.item_id for i in plan.items] == [i.item_id for i in again.items]
    assert [(i.rel, i.row_start, i.row_end) for i in plan.items] == [
        ("a.parquet", 0, 50), ("b.parquet", 0, 300), ("b.parquet", 300, 600), ("b.parquet", 600, 900),
        ("b.parquet", 900, 1000)]
    assert plan.items[1].row_groups == (0, 3)
    assert len({i.item_id for i in plan.items}) == 5
    assert plan.known_rows == 1050 and plan.est_tokens > 0
    assert "2 file(s), 5 work item(s), 1,050 rows" in plan.describe()


def test_changed_file_gets_new_item_ids(tmp_path):
    write_parquet(tmp_path / "a.parquet", 10, 10)
    cfg = InputConfig(paths=[str(tmp_path / "*.parquet")])
    before = make_plan(cfg).items[0].item_id
    write_parquet(tmp_path / "a.parquet", 11, 10)
    assert make_plan(cfg).items[0].item_id != before


def test_directory_and_overlapping_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "x.parquet", 5, 5)
    write_parquet(tmp_path / "y.parquet", 5, 5)
    plan = make_plan(InputConfig(paths=[str(tmp_path), str(tmp_path / "*.parquet")]))
    assert sorted(f.rel for f in plan.files) == ["sub/x.parquet", "y.parquet"]


def same_name_in_two_folders(tmp_path):
    """x/2025/part-0.parquet and x/2026/part-0.parquet, equal in size and mtime: only their folders tell them apart."""
    for year in ("2025", "2026"):
        (tmp_path / "x" / year).mkdir(parents=True)
        write_parquet(tmp_path / "x" / year / "part-0.parquet", 5, 5)
        os.utime(tmp_path / "x" / year / "part-0.parquet", ns=(1_700_000_000_000_000_000,) * 2)
    return [str(tmp_path / "x" / year / "*.parquet") for year in ("2025", "2026")]


def test_files_of_two_globs_sharing_names_are_told_apart_by_their_common_prefix(tmp_path):
    plan = make_plan(InputConfig(paths=same_name_in_two_folders(tmp_path)))
    assert [f.rel for f in plan.files] == ["2025/part-0.parquet", "2026/part-0.parquet"]
    assert [i.rel for i in plan.items] == ["2025/part-0.parquet", "2026/part-0.parquet"]
    assert len({i.item_id for i in plan.items}) == 2


def test_one_glob_keeps_paths_relative_to_its_own_folder(tmp_path):
    """Where inputs did not collide, paths (so item ids and generated ids) stay what earlier versions made."""
    globs = same_name_in_two_folders(tmp_path)
    assert [f.rel for f in make_plan(InputConfig(paths=globs[:1])).files] == ["part-0.parquet"]
    assert [f.rel for f in make_plan(InputConfig(paths=[str(tmp_path / "x")])).files] == [
        "2025/part-0.parquet", "2026/part-0.parquet"]
    assert [f.rel for f in make_plan(InputConfig(paths=[str(tmp_path / "x" / "*" / "*.parquet")])).files] == [
        "2025/part-0.parquet", "2026/part-0.parquet"]


def test_remote_globs_are_relative_to_their_common_prefix_or_whole_across_buckets():
    def listed(*urls):
        return [InputFile(url, url.rsplit("/", 1)[1], 1, "etag") for url in urls]

    same_bucket = relative_to_common_prefix(listed("s3://b/x/2025/p.parquet", "s3://b/x/2026/p.parquet"))
    assert [f.rel for f in same_bucket] == ["2025/p.parquet", "2026/p.parquet"]
    two_buckets = relative_to_common_prefix(listed("s3://b1/p.parquet", "s3://b2/p.parquet"))
    assert [f.rel for f in two_buckets] == ["s3://b1/p.parquet", "s3://b2/p.parquet"]


def bad_files(tmp_path):
    write_parquet(tmp_path / "a.parquet", 5, 5)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "m.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    good = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(good[: len(good) // 2])


def test_unreadable_or_drifted_files_fail_the_plan_with_on_bad_file_fail(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        make_plan(InputConfig(paths=[str(tmp_path / "*.parquet")]))
    bad_files(tmp_path)
    fail = {"on_bad_file": "fail"}
    with pytest.raises(InputError, match=r"a\.parquet: column\(s\) \['body'\] not found"):
        make_plan(InputConfig(paths=[str(tmp_path / "a.parquet")], text_column="body", **fail))
    with pytest.raises(InputError, match="n.parquet: text column 'text' has type int64"):
        make_plan(InputConfig(paths=[str(tmp_path / "n.parquet")], **fail))
    for name in ("bad.parquet", "t.parquet"):
        with pytest.raises(InputError, match=f"{name}: not a readable Parquet file.*on_bad_file: reject"):
            make_plan(InputConfig(paths=[str(tmp_path / name)], **fail))


def test_unreadable_or_drifted_files_become_rejected_items_by_default(tmp_path):
    bad_files(tmp_path)
    plan = make_plan(InputConfig(paths=[str(tmp_path / "*.parquet")]))
    reasons = {i.rel: i.bad_reason for i in plan.items}
    assert reasons == {"a.parquet": None, "bad.parquet": "unreadable_file", "m.parquet": "schema_mismatch",
                       "n.parquet": "schema_mismatch", "t.parquet": "unreadable_file"}
    assert plan.known_rows == 5 and plan.describe().count("WARNING: rejecting") == 4
    again = make_plan(InputConfig(paths=[str(tmp_path / "*.parquet")]))
    assert [i.item_id for i in again.items] == [i.item_id for i in plan.items]
    with pytest.raises(InputError, match=r"every input file is unusable.*column\(s\) \['nope'\] not found"):
        make_plan(InputConfig(paths=[str(tmp_path / "*.parquet")], text_column="nope"))


def test_jsonl_is_one_item_per_file_with_rows_learnt_when_read(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    plan = make_plan(InputConfig(paths=[str(tmp_path / "*.jsonl")], format="jsonl"))
    assert len(plan.items) == 1 and plan.items[0].row_end is None and plan.unknown_row_items == 1


def _corpus_of_many_files(folder, n):
    for k in range(n):
        write_parquet(folder / f"part-{k:02d}.parquet", 7 + k, 5)
    (folder / "part-99.parquet").write_bytes(b"not parquet")  # a bad file planned remotely is still rejected whole
    return InputConfig(paths=[str(folder / "*.parquet")], rows_per_item=10)


def _shape(plan):
    return [(i.item_id, i.rel, i.row_start, i.row_end, i.row_groups, i.bad_reason) for i in plan.items]


def test_many_footers_are_read_by_cluster_tasks_a_chunk_each(tmp_path, monkeypatch):
    from pipelines.input import plan as plan_module

    cfg = _corpus_of_many_files(tmp_path, 9)
    monkeypatch.setattr(plan_module, "FOOTERS_ON_CLUSTER", 5)
    monkeypatch.setattr(plan_module, "FOOTER_TASK_FILES", 4)
    calls = []

    def on_cluster(fn, chunks, **kwargs):  # what a cluster does, here in turn: a chunk is one task's argument
        calls.append([len(c) for c in chunks])
        return [fn(c, **kwargs) for c in chunks]

    threaded = make_plan(cfg)
    remote = make_plan(cfg, on_cluster=on_cluster)
    assert calls == [[4, 4, 2]] and _shape(remote) == _shape(threaded) and remote.footers_read == 10
    assert [i.bad_reason for i in remote.items].count("unreadable_file") == 1
    monkeypatch.setattr(plan_module, "FOOTERS_ON_CLUSTER", 10)  # at the threshold: the driver's threads
    make_plan(cfg, on_cluster=on_cluster)
    assert len(calls) == 1


@pytest.mark.integration
def test_cluster_footer_reads_run_as_ray_tasks_and_plan_the_same_items(tmp_path, monkeypatch, session_ray):
    from pipelines.config import RunConfig
    from pipelines.input import plan as plan_module
    from pipelines.ray_runtime import map_on_cluster

    cfg = _corpus_of_many_files(tmp_path, 6)
    monkeypatch.setattr(plan_module, "FOOTERS_ON_CLUSTER", 2)
    monkeypatch.setattr(plan_module, "FOOTER_TASK_FILES", 3)
    real, chunks = map_on_cluster(RunConfig(ray_address=session_ray)), []

    def on_cluster(fn, args, **kwargs):
        chunks.append(len(args))
        return real(fn, args, **kwargs)

    assert _shape(make_plan(cfg, on_cluster=on_cluster)) == _shape(make_plan(cfg)) and chunks == [3]
