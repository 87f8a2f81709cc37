"""S3 that fails 5% of requests (503 SlowDown, resets before and after the request took effect): zero loss."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.faulty_proxy import FAULT_KINDS, FaultyProxy

from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output
from pipelines.storage import Storage

pytestmark = pytest.mark.integration


def test_embed_through_a_faulty_s3_loses_and_duplicates_nothing(ray_local, s3_bucket, s3_server,
                                                                tiny_embedding_model):
    bucket, opts = s3_bucket
    fs = s3_server.filesystem()
    ids = []
    for shard in range(3):
        shard_ids = [f"s{shard}-{i}" for i in range(40)]
        texts = [f"shard {shard} text {i} " + "word " * (i % 11) for i in range(40)]
        texts[3] = ""
        ids += shard_ids
        with fs.open(f"{bucket}/corpus/part-{shard}.parquet", "wb") as fh:
            pq.write_table(pa.table({"doc_id": shard_ids, "text": texts}), fh, row_group_size=10)
    out = f"s3://{bucket}/vectors"
    bucket_fs = Storage(out, opts).fs
    left_behind = bucket_fs.call_s3("create_multipart_upload", Bucket=bucket, Key="vectors/data/killed.parquet")

    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    with FaultyProxy(host, int(port), every=20) as proxy:
        faulty = {**opts, "endpoint_url": proxy.endpoint_url}
        summary = run_embed(EmbedJobConfig.model_validate({
            "input": {"paths": [f"s3://{bucket}/corpus/*.parquet"], "id_column": "doc_id", "rows_per_item": 10,
                      "storage_options": faulty},
            "model": {"path": str(tiny_embedding_model), "max_length": 24},
            "output": {"path": out},
            "compute": {"batch_rows": 10},
            "run": {"lock_stale_s": 60},
        }))
        stats = proxy.stats

    print("proxy:", stats)
    assert stats["requests"] >= 60 and all(stats[k] >= stats["requests"] // 60 for k in FAULT_KINDS)
    assert summary["items_processed"] == 12 and summary["totals"]["rows"] == 117
    report = verify_output(out, opts)
    assert report.ok, report.problems
    assert report.counts["orphans"] == 0 and report.counts["pending_uploads"] == 0
    got = read_committed(out, opts).column("id").to_pylist()
    rejected = read_committed(out, opts, rejects=True).column("id").to_pylist()
    assert len(got) == len(set(got)) == 117 and not set(got) & set(rejected)
    assert sorted(got + rejected) == sorted(ids)
    assert left_behind["UploadId"] not in {u for _, u in Storage(out, opts).pending_uploads()}
