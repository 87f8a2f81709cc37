"""Credentials never reach `_job.json`: a catalog's credential-named properties are left out of the recorded
config and a URL's password is cut, while the rest of the catalog config is kept for `embedrank publish`."""

import json

from common.credentials import without_credentials, without_password
from pipelines.embed.config import EmbedJobConfig
from pipelines.lifecycle import recorded_config

SECRETS = {"s3.secret-access-key": "SECRET-one", "s3.access-key-id": "KEYID-two", "token": "TOKEN-three",
           "credential": "client:CRED-four", "s3.session-token": "SESSION-five"}


def test_a_url_loses_its_password_and_nothing_else():
    assert without_password("postgresql+psycopg2://me:pw%40x@db.local:5432/cat") == \
        "postgresql+psycopg2://me@db.local:5432/cat"
    assert without_password("postgresql://:onlypw@db/cat") == "postgresql://db/cat"
    for kept in ("postgresql://me@db/cat", "sqlite:////tmp/c.db", "s3://bucket/warehouse", "not a url: a:b@c"):
        assert without_password(kept) == kept
    assert without_credentials({**SECRETS, "type": "rest", "uri": "https://u:p@cat.example/api"}) == {
        "type": "rest", "uri": "https://u@cat.example/api"}


def test_the_recorded_config_keeps_the_catalog_without_its_credentials(tmp_path):
    cfg = EmbedJobConfig.model_validate({
        "input": {"paths": [str(tmp_path / "*.parquet")]},
        "model": {"path": str(tmp_path / "model")},
        "output": {"path": str(tmp_path / "out"), "storage_options": {"secret": "STORAGE-six"},
                   "table": {"name": "docs", "catalog": {"name": "prod", "properties": {
                       **SECRETS, "type": "sql", "uri": "postgresql://embed:PW-seven@127.0.0.1:5432/iceberg",
                       "warehouse": "s3://bucket/wh"}}}},
    })
    recorded = recorded_config(cfg)
    text = json.dumps(recorded)
    for secret in [*SECRETS.values(), "STORAGE-six", "PW-seven"]:
        assert secret not in text
    assert recorded["output"]["table"]["catalog"] == {"name": "prod", "properties": {
        "type": "sql", "uri": "postgresql://embed@127.0.0.1:5432/iceberg", "warehouse": "s3://bucket/wh"}}
    assert cfg.output.table.catalog.properties["token"] == "TOKEN-three"  # the run itself keeps them
