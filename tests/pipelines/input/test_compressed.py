"""Compressed JSONL inputs read transparently; anything no codec reads is refused, never turned into rejects."""

import bz2
import gzip
import json

import pytest
from backports import zstd

from common.errors import InputError
from pipelines.embed.config import InputConfig
from pipelines.input.plan import make_plan
from pipelines.input.reading import read_item

DOCS = [{"id": f"doc-{i}", "text": f"document number {i} " + "é" * (i % 7)} for i in range(50)]
PLAIN = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS).encode()
CODECS = {"gz": gzip.compress, "bz2": bz2.compress, "zst": zstd.compress}
"""Each suffix and a compressor from outside the code under test (the standard library, the zstd backport)."""


def read_all(cfg):
    plan = make_plan(cfg)
    rows = [r for item in plan.items for r in read_item(item, cfg).to_pylist()]
    return plan, rows


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_each_codec_reads_every_document(tmp_path, suffix):
    (tmp_path / f"corpus.jsonl.{suffix}").write_bytes(CODECS[suffix](PLAIN))
    # a tiny item size: a plain file would be cut into byte ranges; a compressed one stays whole
    cfg = InputConfig(paths=[str(tmp_path)], format="jsonl", id_column="id", jsonl_item_mb=0.0001)
    plan, rows = read_all(cfg)
    assert len(plan.items) == 1 and plan.items[0].byte_range is None
    assert [r["_reject"] for r in rows] == [None] * 50
    assert [(r["id"], r["text"]) for r in rows] == [(d["id"], d["text"]) for d in DOCS]


def test_unknown_suffix_is_refused_at_planning(tmp_path):
    (tmp_path / "corpus.jsonl.br").write_bytes(b"\x0b\x02\x80not brotli")
    cfg = InputConfig(paths=[str(tmp_path / "*.jsonl.br")], format="jsonl")
    with pytest.raises(InputError, match=r"corpus\.jsonl\.br: cannot read a '\.br' file.*\.jsonl\.gz"):
        make_plan(cfg)


@pytest.mark.parametrize("content, found", [(PLAIN, "it does not start with a gzip header"),
                                            (zstd.compress(PLAIN), "its bytes are zstd")])
def test_a_file_not_in_its_names_codec_is_refused_at_planning(tmp_path, content, found):
    (tmp_path / "corpus.jsonl.gz").write_bytes(content)
    cfg = InputConfig(paths=[str(tmp_path / "corpus.jsonl.gz")], format="jsonl")
    with pytest.raises(InputError, match=f"corpus.jsonl.gz: named as gzip but {found}"):
        make_plan(cfg)


def test_a_broken_stream_fails_the_read_instead_of_rejecting_rows(tmp_path):
    whole = gzip.compress(PLAIN)
    (tmp_path / "corpus.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    cfg = InputConfig(paths=[str(tmp_path / "corpus.jsonl.gz")], format="jsonl")
    item = make_plan(cfg).items[0]
    with pytest.raises(InputError, match=r"corpus\.jsonl\.gz: not a readable gzip stream"):
        read_item(item, cfg)


def test_compressed_bytes_named_plain_jsonl_are_refused(tmp_path):
    (tmp_path / "corpus.jsonl").write_bytes(gzip.compress(PLAIN))
    cfg = InputConfig(paths=[str(tmp_path / "corpus.jsonl")], format="jsonl")
    item = make_plan(cfg).items[0]
    with pytest.raises(InputError, match=r"corpus\.jsonl: named \.jsonl but its bytes are gzip-compressed"):
        read_item(item, cfg)
