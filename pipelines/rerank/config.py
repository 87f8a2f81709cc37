"""The reranking job's config: candidate pairs, optional documents by id, the reranker, the ranked output."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from actors import rerank_prompts
from actors.settings import RerankSettings
from common.columns import DOC_ID, QUERY, QUERY_ID, TEXT
from pipelines.config import (AUTO, FieldSpec, JobConfigBase, ModelConfigBase, SourceConfig, Strict, TableConfig,
                              auto_or, model_path_field, storage_options_field, target_file_mb_field)

RankBuckets = auto_or(Annotated[int, Field(ge=1)])


class RerankInputConfig(SourceConfig):
    query_id_column: str = Field("query_id", description="Column holding query ids.")
    query_column: str = Field("query", description="Column holding query texts.")
    doc_id_column: str = Field("doc_id", description="Column holding candidate document ids.")
    text_column: str | None = Field(
        "text", description="Column holding candidate document texts; null when `documents` supplies them."
    )

    def fields(self) -> list[FieldSpec]:
        fields = [FieldSpec(QUERY_ID, self.query_id_column, "id"), FieldSpec(QUERY, self.query_column, "text"),
                  FieldSpec(DOC_ID, self.doc_id_column, "id")]
        return fields + ([FieldSpec(TEXT, self.text_column, "text")] if self.text_column else [])


class DocumentsConfig(SourceConfig):
    id_column: str = Field("doc_id", description="Column holding document ids (joined with input.doc_id_column).")
    text_column: str = Field("text", description="Column holding document texts.")
    join_partitions: int = Field(16, gt=0, description="Hash partitions of the candidates ⋈ documents join.")

    def fields(self) -> list[FieldSpec]:
        return [FieldSpec(DOC_ID, self.id_column, "id"), FieldSpec(TEXT, self.text_column, "text")]


class RerankModelConfig(ModelConfigBase):
    path: str = model_path_field("Qwen3-Reranker")
    instruction: str = Field(rerank_prompts.DEFAULT_INSTRUCTION,
                             description="Task instruction of the `<Instruct>:` line.")
    max_length: int = Field(8192, ge=64, description="Tokens per pair, template included; documents are cut.")
    share_prefix: bool = Field(
        True, description="Compute each query's shared prompt prefix once and reuse its KV cache."
    )


class RerankOutputConfig(Strict):
    path: str = Field(description="Output root (local path or fsspec URL).")
    top_k: int | None = Field(None, gt=0, description="Keep only the best k candidates per query; null = all.")
    rank_buckets: RankBuckets = Field(
        AUTO, description="Queries are hashed into this many buckets for ranking; a bucket is ranked in one task (in "
        "memory) and committed whole. auto: ⌈committed pairs ÷ 2,000,000⌉ (`pipelines.rerank.ranking."
        "MAX_PAIRS_PER_BUCKET`, ≈0.7 GiB a task), chosen when the rank phase starts, printed and recorded in each "
        "rank commit; a resumed rank phase keeps the count its commits record. An integer fixes the count."
    )
    target_file_mb: float = target_file_mb_field()
    storage_options: dict[str, Any] | None = storage_options_field("the output filesystem")
    table: TableConfig | None = Field(None, description="Also publish the final ranks (and rejects) as Apache "
                                      "Iceberg tables.")


class RerankJobConfig(JobConfigBase):
    input: RerankInputConfig = Field(description="The candidate pairs: one (query, document) pair a row.")
    documents: DocumentsConfig | None = Field(
        None, description="Document texts by id, joined to the candidates on the cluster; null = texts inline."
    )
    model: RerankModelConfig = Field(description="The reranker model.")
    output: RerankOutputConfig = Field(description="Where committed scores and ranks go.")

    @model_validator(mode="after")
    def _one_text_source(self) -> "RerankJobConfig":
        if self.documents is None and self.input.text_column is None:
            raise ValueError("input.text_column is null, so `documents` must say where document texts are")
        if self.documents is not None and self.input.text_column is not None:
            raise ValueError("with `documents`, set input.text_column: null (texts come from the documents)")
        return self

    def replica_settings(self, model_digest: str | None) -> RerankSettings:
        """What each reranker replica loads and how it runs."""
        return RerankSettings(**self._replica_fields(model_digest), instruction=self.model.instruction,
                              max_length=self.model.max_length, share_prefix=self.model.share_prefix)
