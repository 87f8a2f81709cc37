"""Stages declare their columns: a batch missing one fails naming stage and column, the wrapper Ray maps keeps
the stage's name and pickles, every graph's chain of declarations holds, and declarations match what stages do."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from actors.replicas import EmbedReplica
from actors.replicas import RerankReplica
from common.columns import DOC_FOUND, DOC_ID, DOC_REJECT, INPUT_IDS, ITEM_JSON, QUERY_ID, REJECT, ROW, TEXT
from common.errors import EmbedrankError
from pipelines import graph
from pipelines.embed import graph as embed_graph
from pipelines.reindex import graph as reindex_graph
from pipelines.rerank import graph as rerank_graph
from pipelines.embed.config import EmbedJobConfig, InputConfig
from pipelines.input.plan import WorkItem, make_plan
from pipelines.input.reading import read_items, row_columns
from pipelines.reindex.stages import digest_items
from pipelines.rerank.config import RerankJobConfig
from pipelines.rerank.joining import order_joined_item, read_documents
from pipelines.stages import EVERY_COLUMN, MissingColumnError, Stage

# --- the run-time check ---------------------------------------------------------------------------------------

def test_a_missing_column_fails_naming_the_stage_and_the_column():
    batch = pa.table({"_item": ["a"], "_row": [0], "doc_id": ["d"]})
    with pytest.raises(MissingColumnError) as err:
        order_joined_item.stage.task()(batch)
    message = str(err.value)
    assert "order_joined_item" in message and repr(REJECT) in message and repr(TEXT) in message
    assert "['_item', '_row', 'doc_id']" in message  # what the batch has
    assert isinstance(err.value, EmbedrankError) and err.value.exit_code == 2


def test_a_replica_class_checks_its_batch_before_any_model_work():
    checked = embed_graph.EMBED_REPLICA.task()
    assert issubclass(checked, EmbedReplica)
    replica = object.__new__(checked)  # no model loaded: the check runs before the replica's own code
    with pytest.raises(MissingColumnError, match=f"stage EmbedReplica: .*{INPUT_IDS!r}"):
        replica(pa.table({"id": ["a"], "n_tokens": [3]}))


def test_a_batch_with_every_needed_column_runs_the_stage_unchanged():
    joined = pa.table({"_row": [1, 0], "_reject": pa.array([None, None], pa.string()), "text": ["x", "y"],
                       "_doc_reject": pa.array([None, None], pa.string()), "_doc_found": [True, True]})
    assert order_joined_item.stage.task()(joined).equals(order_joined_item(joined))


# --- the wrapper Ray maps -------------------------------------------------------------------------------------

@pytest.mark.parametrize("declared, name", [
    (read_items.stage, "read_items"), (order_joined_item.stage, "order_joined_item"),
    (embed_graph.EMBED_REPLICA, "EmbedReplica"), (rerank_graph.SCORE_REPLICA, "RerankReplica"),
])
def test_the_wrapper_keeps_the_name_ray_data_shows_and_pickles(declared, name):
    task = declared.task()
    assert task.__name__ == name and task.__qualname__ == declared.fn.__qualname__  # MapBatches(<name>)
    assert isinstance(task, type) == isinstance(declared.fn, type)  # Ray Data runs classes as actor pools
    shipped = cloudpickle.loads(cloudpickle.dumps(task))
    assert shipped.__name__ == name
    call = object.__new__(shipped) if isinstance(shipped, type) else shipped
    with pytest.raises(MissingColumnError, match=f"stage {name}:"):
        call(pa.table({"unrelated": [1]}))


def test_a_task_function_stays_the_plain_function_ray_pickles_by_name():
    assert cloudpickle.loads(cloudpickle.dumps(read_items)) is read_items
    assert read_items.stage.fn is read_items


# --- the build-time check: each graph's chain of declarations ---------------------------------------------------

class FakeDataset:
    """Stands in for a Ray Data dataset: records the operators a graph applies, under Ray Data's names."""

    def __init__(self, ops):
        self.ops = ops

    def map_batches(self, fn, **options):
        return FakeDataset(self.ops + [f"MapBatches({fn.__name__})"])

    def groupby(self, key, num_partitions=None):
        return FakeGroups(self.ops + [f"GroupBy({key})"])

    def join(self, other, join_type, num_partitions, on):
        return FakeDataset(self.ops + [f"Join({join_type} on {on[0]}: {', '.join(other.ops)})"])


class FakeGroups(FakeDataset):
    def map_groups(self, fn, **options):
        return FakeDataset(self.ops + [f"MapGroups({fn.__name__})"])


@pytest.fixture
def fake_ray(monkeypatch):
    """Graphs built without Ray: sources, the actor pool and the tokenizer are stubbed; the columns are real."""
    monkeypatch.setattr(graph, "item_source", lambda items: graph.Flow(FakeDataset(["Items"]), frozenset({ITEM_JSON})))
    monkeypatch.setattr(graph, "path_source", lambda paths: graph.Flow(FakeDataset(["Paths"]), frozenset({"path"})))
    monkeypatch.setattr(graph, "source", lambda column, values, blocks: graph.Flow(FakeDataset(["Tasks"]),
                                                                                   frozenset({column})))
    monkeypatch.setattr(graph, "model_pool", lambda compute: {})
    monkeypatch.setattr(embed_graph, "tokenizer_args", lambda cfg, fingerprint: {})


def embed_config():
    return EmbedJobConfig.model_validate({
        "input": {"paths": ["in"], "id_column": "doc_id", "passthrough_columns": ["lang"]},
        "model": {"path": "m"}, "output": {"path": "out", "partition_by": "lang"}})


def rerank_config(documents: bool):
    docs = {"documents": {"paths": ["docs"]}, "input": {"paths": ["in"], "text_column": None}} if documents \
        else {"input": {"paths": ["in"]}}
    return RerankJobConfig.model_validate({**docs, "model": {"path": "m"}, "output": {"path": "out"}})


EMBED_AND_WRITE = ["MapBatches(EmbedReplica)", "MapBatches(write_pieces)"]


def test_every_graph_chains_its_stages_consistently(fake_ray):
    cfg = embed_config()
    assert embed_graph.build_embed_graph(cfg, ["item"], None, {}).ops == [
        "Items", "MapBatches(read_and_tokenize)", *EMBED_AND_WRITE]
    item = WorkItem("i", "in/p.parquet", "p.parquet", "parquet", 0, 1, (0, 1), 0)
    assert reindex_graph.build_reindex_graph(cfg, [item], None, {}, "fp", None, None, None).ops == [
        "Items", "MapBatches(read_hash_and_tokenize)", *EMBED_AND_WRITE]
    assert reindex_graph.build_reindex_graph(cfg, [item], None, {}, "fp", {"i": ["f"]}, None, {"embedding": pa.list_(pa.float32(), 4)}).ops == [
        "Tasks", "MapBatches(carry_locally)", *EMBED_AND_WRITE]
    assert reindex_graph.build_digest_graph(cfg.input, [item], "fp", 0.25).ops == ["Items", "MapBatches(digest_items)"]
    assert reindex_graph.build_diff_graph(cfg.input, [{"items": [], "base_files": ["f"]}], "fp", None, 0.25).ops == [
        "Tasks", "MapBatches(diff_file)"]
    score = ["MapBatches(RerankReplica)", "MapBatches(write_pieces)"]
    assert rerank_graph.build_score_graph(rerank_config(documents=False), ["i"], [], None, {}).ops == [
        "Items", "MapBatches(read_items)", *score]
    assert rerank_graph.build_score_graph(rerank_config(documents=True), ["i"], ["d"], None, {}).ops == [
        "Items", "MapBatches(read_items)", "Join(left_outer on doc_id: Items, MapBatches(read_documents))",
        "GroupBy(_item)", "MapGroups(order_joined_item)", *score]
    assert rerank_graph.build_rank_graph(["f"], None, {}, 4, [], None, 0.25, {}).ops == [
        "Paths", "MapBatches(read_score_files)", "GroupBy(_bucket)", "MapGroups(rank_bucket)"]


def test_wiring_a_stage_where_its_needs_are_unmet_fails_as_the_graph_is_built():
    items = graph.Flow(FakeDataset(["Items"]), frozenset({ITEM_JSON}))
    with pytest.raises(AssertionError, match=r"stage EmbedReplica needs \['input_ids'\]"):
        items.map_batches(embed_graph.EMBED_REPLICA)
    with pytest.raises(AssertionError, match="groups by '_item'"):
        items.map_groups("_item", order_joined_item.stage)
    candidates = items.map_batches(read_items.stage.adding(QUERY_ID, DOC_ID, TEXT))  # texts inline …
    documents = items.map_batches(read_documents.stage)  # … and joined in: Ray would rename one `text`
    with pytest.raises(AssertionError, match="join on 'doc_id'"):
        candidates.join(documents, on=DOC_ID, join_type="left_outer", num_partitions=1)


def test_columns_after_keeps_drops_and_adds():
    kept = Stage(order_joined_item, needs=(ROW,), adds=(TEXT,), drops=(DOC_FOUND, DOC_REJECT))
    assert kept.columns_after({ROW, DOC_FOUND, DOC_REJECT, QUERY_ID}) == {ROW, QUERY_ID, TEXT}
    replaced = Stage(digest_items, adds=("new",), drops=EVERY_COLUMN)
    assert replaced.columns_after({ROW, TEXT}) == {"new"}


# --- declarations match what the stages do --------------------------------------------------------------------

def test_reading_adds_what_it_declares(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["x", None], "lang": ["en", "de"]}), tmp_path / "p.parquet")
    cfg = InputConfig(paths=[str(tmp_path / "p.parquet")], id_column="doc_id", passthrough_columns=["lang"])
    batch = pa.table({ITEM_JSON: [json.dumps(i.to_dict()) for i in make_plan(cfg).items]})
    declared = read_items.stage.adding(*row_columns(cfg))
    assert set(read_items(batch, cfg).column_names) == declared.columns_after(batch.column_names)


def test_regrouping_joined_candidates_adds_and_drops_what_it_declares():
    joined = pa.table({"_item": ["i", "i"], ROW: [1, 0], QUERY_ID: ["q", "q"], DOC_ID: ["d1", "d0"],
                       REJECT: pa.array([None, None], pa.string()), TEXT: ["t1", "t0"],
                       DOC_REJECT: pa.array([None, None], pa.string()), DOC_FOUND: [True, True]})
    out = order_joined_item(joined)
    assert set(out.column_names) == order_joined_item.stage.columns_after(joined.column_names)


def test_the_replica_declarations_name_real_replica_classes():
    assert embed_graph.EMBED_REPLICA.fn is EmbedReplica and rerank_graph.SCORE_REPLICA.fn is RerankReplica
