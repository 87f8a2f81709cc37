"""A replica times its own start-up and hands the report back once, on its first output batch."""

import json
import time

import pyarrow as pa

from actors import startup
from actors.embedder import EmbedReplica
from actors.settings import EmbedSettings
from actors.tokenize import TextTokenizer, TokenizeBatch
from common.columns import REPLICA_STARTUP


def test_the_report_rides_on_the_first_batch_only():
    report = startup.StartupReport()
    time.sleep(0.01)
    report.ready()
    report.arrived()
    first = report.column(3).to_pylist()
    assert len(set(first)) == 1
    data = json.loads(first[0])
    assert set(data) == {"host", "pid", "imports_s", "load_s", "ready_at", "first_batch_at"}
    assert data["load_s"] >= 0.01 and data["imports_s"] == round(startup.imports_done(), 3) > 0
    assert data["ready_at"] <= data["first_batch_at"] <= time.time()
    later = report.column(2)
    assert later.type == pa.string() and later.null_count == 2


def test_the_embedding_replica_reports_its_start_on_its_first_output_batch(tiny_embedding_model):
    table = pa.table({"id": ["a", "b"], "text": ["first text", "second"], "_reject": pa.nulls(2, pa.string())})
    tokenized = TokenizeBatch(TextTokenizer(str(tiny_embedding_model), None, 64, None))(table)
    before = time.time()
    replica = EmbedReplica(EmbedSettings(path=str(tiny_embedding_model), dtype="float32"))
    first = replica(tokenized).column(REPLICA_STARTUP).to_pylist()
    data = json.loads(first[0])
    assert first[1] == first[0] and before < data["ready_at"] <= data["first_batch_at"]
    assert data["load_s"] > 0 and data["imports_s"] > 0
    assert replica(tokenized).column(REPLICA_STARTUP).null_count == 2
