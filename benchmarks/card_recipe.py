"""The Qwen3-Embedding model card's transformers recipe as a plain script: Parquet in, Parquet out, every core.

    python -m benchmarks.card_recipe --model DIR --input 'corpus/*.parquet' --output OUT [--batch 32]

The peer of E8 (`benchmarks/e8.py`), written from the model card (`reference/qwen3-embedding-model-card.txt`
beside DESIGN.md), not from embedrank's code: `AutoTokenizer.from_pretrained(..., padding_side='left')`,
`AutoModel.from_pretrained(...)`, `tokenizer(texts, padding=True, truncation=True, max_length=8192,
return_tensors="pt")`, the card's `last_token_pool` verbatim and `F.normalize(p=2, dim=1)`. What the card leaves
open, as a user would fill it in: the texts come from the Parquet files (id and text columns), in file order, in
batches of `--batch` (the card embeds its four texts as one batch; a corpus needs batches), and the vectors go to
one Parquet file (`id`, `embedding`). torch runs on every core (`torch.set_num_threads(os.cpu_count())`), and
under `torch.inference_mode()` (the card's snippet keeps autograd on; this spares the peer that cost). Prints one
JSON line: its phases (imports, model load, read, embed, write) and rows.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from benchmarks import peer_io  # noqa: E402


def last_token_pool(last_hidden_states: Tensor,
                    attention_mask: Tensor) -> Tensor:
    left_padding = (attention_mask[:, -1].sum() == attention_mask.shape[0])
    if left_padding:
        return last_hidden_states[:, -1]
    else:
        sequence_lengths = attention_mask.sum(dim=1) - 1
        batch_size = last_hidden_states.shape[0]
        return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def main(argv: list[str] | None = None) -> None:
    args = peer_io.arguments(__doc__.splitlines()[0], argv,
                             max_length={"type": int, "default": 8192, "help": "the card's max_length"})
    phases = {"imports_s": time.perf_counter() - STARTED}

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side='left')
    model = AutoModel.from_pretrained(args.model)
    phases["model_load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ids, texts = peer_io.read_texts(args)
    phases["read_s"] = time.perf_counter() - t

    t = time.perf_counter()
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(texts), args.batch):
            input_texts = texts[start : start + args.batch]
            # Tokenize the input texts
            batch_dict = tokenizer(
                input_texts,
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            batch_dict.to(model.device)
            outputs = model(**batch_dict)
            embeddings = last_token_pool(outputs.last_hidden_state, batch_dict['attention_mask'])
            # normalize embeddings
            embeddings = F.normalize(embeddings, p=2, dim=1)
            vectors.append(embeddings.float().cpu())
    matrix = torch.cat(vectors).numpy()
    phases["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    peer_io.write_vectors(args, ids, matrix)
    phases["write_s"] = time.perf_counter() - t
    peer_io.report(phases, STARTED, len(ids), args.threads)


if __name__ == "__main__":
    main()
