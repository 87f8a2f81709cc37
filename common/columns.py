"""Names of the columns that cross Ray Data stage boundaries, defined once.

Stages in `pipelines/` and the replicas in `actors/` read and add these columns; each stage declares which
it needs and adds (`pipelines.stages.Stage`). Names that start with `_` are the pipeline's own bookkeeping:
they never reach a user's data files (`_item` and `_row` do reach the internal `_scores/` files).
"""

# --- sources of a graph -------------------------------------------------------------------------------------
ITEM_JSON = "item"
"""A planned work item, as JSON: one row per item is where each job's graph starts."""
PATH = "path"
"""A committed file to read (score files, an index version's files)."""

# --- bookkeeping every read row carries ---------------------------------------------------------------------
ITEM = "_item"
"""The row's work item id."""
ROW = "_row"
"""The row's index in its input file (in its work item, for a JSONL item cut from a larger file by bytes)."""
ITEM_ROWS = "_item_rows"
"""How many rows the row's work item has (learnt while reading for JSONL)."""
REJECT = "_reject"
"""Why the row is rejected (a reason code), or null: rejected rows go to `_rejects/`, never to the model."""
READ_BOOKKEEPING = (REJECT, ITEM, ROW, ITEM_ROWS)

# --- what the job reads (each a role of `pipelines.config.FieldSpec`) ---------------------------------------
ID = "id"
TEXT = "text"
QUERY_ID = "query_id"
QUERY = "query"
DOC_ID = "doc_id"

# --- what tokenizing and the models add ---------------------------------------------------------------------
INPUT_IDS = "input_ids"
N_TOKENS = "n_tokens"
TRUNCATED = "truncated"
TOKENIZED = (INPUT_IDS, N_TOKENS, TRUNCATED)
EMBEDDING = "embedding"
PADDED = "_padded"
"""Tokens the replica computed for the row, padding included (efficiency reports)."""
REPLICA_STARTUP = "_replica_startup"
"""A replica's start-up report (JSON, `actors.startup`) on the rows of its first output batch, null on every later
one; the write task hands it to the driver in its piece records."""
SCORE = "score"
RANK = "rank"
BUCKET = "_bucket"
"""The hash bucket of the row's query, ranked whole (rerank, phase 2)."""

# --- candidates joined with their documents (rerank) --------------------------------------------------------
DOC_REJECT = "_doc_reject"
"""Why the joined document is unusable, or null."""
DOC_FOUND = "_doc_found"
"""True where the join found the candidate's document."""

# --- reindex: the diff and the carried vectors --------------------------------------------------------------
CONTENT_HASH = "content_hash"
REJECTED = "_rejected"
IN_SNAPSHOT = "_in_snapshot"
IN_BASE = "_in_base"
BASE_HASH = "_base_hash"
"""The current version's content hash of an id (the diff's base side)."""
BASE_PREFIX = "_base_"
"""Prefix of the current version's columns joined in for carrying (`_base_embedding`, …)."""
CARRY_PREFIX = "_carry_"
"""Rows arriving at the writer with `_carry_<vector column>` set keep those vectors instead of the model's."""
CARRY_EMBEDDING = CARRY_PREFIX + EMBEDDING
"""The carried vector of the default `embedding` column."""
CARRIED = "_carried"
"""True where the row's vector was carried from the current version, not computed."""
TASK_JSON = "task"
"""A reindex task's instructions, as JSON: a file's items and the base files to compare them with, or one item
and the base files its unchanged documents carry their vectors from."""
CONTENT_DIGEST = "content_digest"
"""A work item's content digest (reindex): equal digests mean equal committed rows, whatever the file's name."""
DIFF_JSON = "diff"
"""A reindex diff task's result, as JSON: its counts and the documents it could not match locally."""
