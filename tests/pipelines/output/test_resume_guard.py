"""Resuming into an output made with other model or input settings is refused, naming the difference."""

import copy
import json

import pytest

from common.errors import OutputError
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import embed_fingerprint, run_embed
from pipelines.fingerprint import fingerprint_id
from pipelines.input.plan import make_plan
from pipelines.output.records import ItemCommit
from pipelines.output.root import OutputRoot
from pipelines.rerank.config import RerankJobConfig
from pipelines.rerank.job import rerank_fingerprint
from pipelines.storage import Storage


def config(corpus, out, model, **model_extra):
    return EmbedJobConfig.model_validate({
        "input": {"paths": [str(corpus / "*.jsonl")], "format": "jsonl"},
        "model": {"path": str(model), **model_extra},
        "output": {"path": str(out)},
    })


@pytest.mark.parametrize("change, named", [
    ({"dimensions": 32}, "dimensions: None → 32"),
    ({"instruction": "Find it"}, "instruction: None → 'Find it'"),
    ({"revision": "v2"}, "revision: None → 'v2'"),
    ({"dtype": "bfloat16"}, "dtype: 'float32' → 'bfloat16'"),
    ({"max_length": 512}, "max_length: 8192 → 512"),
    ({"path": "OTHER"}, "model: "),
])
def test_changed_model_settings_are_refused(tmp_path, tiny_embedding_model, change, named):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    original = config(corpus, out, tiny_embedding_model)
    fingerprint = embed_fingerprint(original)
    OutputRoot(Storage(str(out))).prepare(fingerprint, fingerprint_id(fingerprint), make_plan(original.input).items,
                                          {})
    model = tmp_path / "other-model" if change.get("path") else tiny_embedding_model
    if change.get("path"):
        model.mkdir()
        (model / "config.json").write_text((tiny_embedding_model / "config.json").read_text())
        (model / "model.safetensors").write_bytes(b"x")
        change = {}
    with pytest.raises(OutputError, match="holds output of a different job") as err:
        run_embed(config(corpus, out, model, **change))
    assert named in str(err.value)


def refusal(fingerprint_of, original, changed):
    """The message with which an output made with `original` refuses a run with `changed` (no Ray, no model)."""
    out = original.output.path
    first = fingerprint_of(original)
    OutputRoot(Storage(out)).prepare(first, fingerprint_id(first), [], {})
    second = fingerprint_of(changed)
    with pytest.raises(OutputError, match="holds output of a different job") as err:
        OutputRoot(Storage(out)).prepare(second, fingerprint_id(second), [], {})
    return str(err.value)


def changed(schema, data, setting, value):
    """`data` validated as `schema`, and again with the dotted `setting` set to `value` (as `--set` would)."""
    edited = copy.deepcopy(data)
    *sections, key = setting.split(".")
    node = edited
    for section in sections:
        node = node[section]
    node[key] = value
    return schema.model_validate(data), schema.model_validate(edited)


def embed_data(tmp_path):
    return {"input": {"paths": [str(tmp_path / "corpus" / "*.jsonl")], "format": "jsonl"},
            "model": {"path": str(tmp_path / "model")}, "output": {"path": str(tmp_path / "out")}}


@pytest.mark.parametrize("setting, value, named", [
    ("input.text_column", "title", "input.text_column: 'text' → 'title'"),
    ("input.id_column", "doc_id", "input.id_column: None → 'doc_id'"),
    ("input.passthrough_columns", ["lang"], "input.passthrough_columns: [] → ['lang']"),
    ("input.format", "parquet", "input.format: 'jsonl' → 'parquet'"),
    ("input.on_bad_file", "fail", "input.on_bad_file: 'reject' → 'fail'"),
    ("input.jsonl_item_mb", 1, "input.jsonl_item_mb: 64.0 → 1.0"),  # generated ids of a cut file are byte offsets
])
def test_changed_input_settings_are_refused(tmp_path, setting, value, named):
    message = refusal(embed_fingerprint, *changed(EmbedJobConfig, embed_data(tmp_path), setting, value))
    assert named in message


def test_generated_ids_are_a_named_scheme_in_the_fingerprint(tmp_path):
    message = refusal(embed_fingerprint, *changed(EmbedJobConfig, embed_data(tmp_path), "input.id_column", "doc_id"))
    assert "input.id_scheme: 'common-prefix-relative-path:row' → 'id columns'" in message


@pytest.mark.parametrize("setting, value", [
    ("input.paths", ["/elsewhere/snapshot-2/*.jsonl"]),
    ("input.rows_per_item", 7),
    ("input.storage_options", {"anon": True}),
])
def test_where_the_input_is_and_how_it_is_cut_is_not_in_the_fingerprint(tmp_path, setting, value):
    """A reindex reads a new snapshot path every time; item splits are checked by the plan, not the fingerprint."""
    original, moved = changed(EmbedJobConfig, embed_data(tmp_path), setting, value)
    assert embed_fingerprint(original) == embed_fingerprint(moved)


def rerank_data(tmp_path, documents=False):
    data = {"input": {"paths": [str(tmp_path / "pairs" / "*.parquet")]},
            "model": {"path": str(tmp_path / "model")}, "output": {"path": str(tmp_path / "out")}}
    if documents:
        data["input"]["text_column"] = None
        data["documents"] = {"paths": [str(tmp_path / "docs" / "*.parquet")]}
    return data


@pytest.mark.parametrize("setting, value, documents, named", [
    ("input.query_id_column", "qid", False, "input.query_id_column: 'query_id' → 'qid'"),
    ("input.query_column", "question", False, "input.query_column: 'query' → 'question'"),
    ("input.doc_id_column", "pid", False, "input.doc_id_column: 'doc_id' → 'pid'"),
    ("input.text_column", "passage", False, "input.text_column: 'text' → 'passage'"),
    ("input.format", "jsonl", False, "input.format: 'parquet' → 'jsonl'"),
    ("input.on_bad_file", "fail", False, "input.on_bad_file: 'reject' → 'fail'"),
    ("documents.id_column", "pid", True, "documents.id_column: 'doc_id' → 'pid'"),
    ("documents.text_column", "body", True, "documents.text_column: 'text' → 'body'"),
    ("documents.format", "jsonl", True, "documents.format: 'parquet' → 'jsonl'"),
    ("documents.on_bad_file", "fail", True, "documents.on_bad_file: 'reject' → 'fail'"),
])
def test_changed_rerank_input_settings_are_refused(tmp_path, setting, value, documents, named):
    data = rerank_data(tmp_path, documents)
    assert named in refusal(rerank_fingerprint, *changed(RerankJobConfig, data, setting, value))


def two_file_output(tmp_path):
    """An output prepared for a two-file corpus, each item committed: (config, fingerprint, fp id, root, plan)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "alpha"}\n')
    (corpus / "b.jsonl").write_text('{"text": "beta"}\n')
    cfg = EmbedJobConfig.model_validate(embed_data(tmp_path))
    fingerprint = embed_fingerprint(cfg)
    fp_id = fingerprint_id(fingerprint)
    root = OutputRoot(Storage(cfg.output.path))
    items = make_plan(cfg.input).items
    assert sorted(i.rel for i in items) == ["a.jsonl", "b.jsonl"]
    root.prepare(fingerprint, fp_id, items, {})
    for item in items:
        root.write_commit(ItemCommit(item=item.item_id, fingerprint_id=fp_id, source=item.rel,
                                     row_start=item.row_start, row_end=1, rows=1))
    assert OutputRoot(Storage(cfg.output.path)).prepare(fingerprint, fp_id, items, {}).keys() == \
        {i.item_id for i in items}  # a consistent output resumes
    return cfg, fingerprint, fp_id, root, items


def test_a_commit_record_of_another_fingerprint_is_refused(tmp_path):
    """`_job.json` matches the run, but one record in `_commits/` was written by another job: refused, not mixed."""
    cfg, fingerprint, fp_id, root, items = two_file_output(tmp_path)
    record = tmp_path / "out" / "_commits" / f"{items[1].item_id}.json"
    data = json.loads(record.read_text())
    data["fingerprint_id"] = "0" * len(fp_id)
    record.write_text(json.dumps(data))
    assert root.read_job()["fingerprint_id"] == fp_id
    with pytest.raises(OutputError, match=r"1 commit\(s\) carry another fingerprint"):
        OutputRoot(Storage(cfg.output.path)).prepare(fingerprint, fp_id, items, {})
    assert json.loads(record.read_text())["fingerprint_id"] == "0" * len(fp_id)  # nothing was touched


def test_a_committed_item_missing_from_the_plan_is_refused_naming_its_file(tmp_path):
    """The input folder lost a file whose item is committed: the run is refused and names the file."""
    cfg, fingerprint, fp_id, root, _ = two_file_output(tmp_path)
    (tmp_path / "corpus" / "b.jsonl").unlink()
    plan = make_plan(cfg.input).items
    assert [i.rel for i in plan] == ["a.jsonl"]
    with pytest.raises(OutputError, match=r"1 committed item\(s\) are not in the current plan") as err:
        OutputRoot(Storage(cfg.output.path)).prepare(fingerprint, fp_id, plan, {})
    assert "no longer listed (removed, or input.paths differs): b.jsonl" in str(err.value)
    assert [i["rel"] for i in root.read_job()["items"]] == ["a.jsonl", "b.jsonl"]  # `_job.json` not rewritten


def test_with_an_id_column_the_jsonl_cut_is_checked_by_the_plan_not_the_fingerprint(tmp_path):
    """Ids from a column do not depend on the cut, so a reindex may change it freely; a resume whose items are cut
    otherwise is still refused (its committed items are not in the plan), naming the settings that cut."""
    data = embed_data(tmp_path)
    data["input"]["id_column"] = "id"
    original, recut = changed(EmbedJobConfig, data, "input.jsonl_item_mb", 30 / (1 << 20))
    assert embed_fingerprint(original) == embed_fingerprint(recut)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(f'{{"id": "{i}", "text": "t{i}"}}\n' for i in range(4)))
    fingerprint = embed_fingerprint(original)
    fp_id = fingerprint_id(fingerprint)
    (item,) = make_plan(original.input).items
    root = OutputRoot(Storage(original.output.path))
    root.prepare(fingerprint, fp_id, [item], {})
    root.write_commit(ItemCommit(item=item.item_id, fingerprint_id=fp_id, source=item.rel, row_start=0, row_end=4,
                                 rows=4))
    cut = make_plan(recut.input).items
    assert len(cut) > 1 and all(i.byte_range for i in cut)
    with pytest.raises(OutputError, match=r"1 committed item\(s\) are not in the current plan") as err:
        OutputRoot(Storage(original.output.path)).prepare(fingerprint, fp_id, cut, {})
    assert "input.jsonl_item_mb" in str(err.value) and "a.jsonl" in str(err.value)
