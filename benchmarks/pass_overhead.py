"""What one forward pass costs beyond its tokens, in tokens: the default of `model.batch_overhead_tokens`.

    python -m benchmarks.pass_overhead                          # CPU: the realistic 2-layer Qwen3 of the benchmarks
    python -m benchmarks.pass_overhead --device cuda --layers 28 --dtype bfloat16   # Qwen3-0.6B's shape on a GPU

Times the embedder's forward pass (right-padded ids + attention mask, SDPA) on random-weight Qwen3 for many
shapes (rows × length within the token budget), fits seconds = a·padded tokens + b·rows·length² + c by least
squares over the per-shape medians, and prints c ÷ a: what a pass costs besides its tokens. The micro-batch
planner (`actors.batching.plan_micro_batches`) cuts sorted rows where padding a short row would cost more.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch


def build(args) -> torch.nn.Module:
    from transformers import AutoModel, Qwen3Config

    config = Qwen3Config(vocab_size=151936, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=32768, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):
        return AutoModel.from_config(config, dtype=getattr(torch, args.dtype)).eval()


def time_pass(model, rows: int, length: int, device: str, repeats: int) -> float:
    ids = torch.randint(0, 151000, (rows, length), device=device)
    mask = torch.ones_like(ids)
    mask[-1, length // 2:] = 0  # one padded row, as the planner's batches have: the masked SDPA path
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first is a warm-up


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--budget", type=int, default=16384, help="largest rows × length timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    lengths = [16, 32, 64, 128, 256, 512, 1024]
    shapes = [(r, n) for r, n in itertools.product([1, 2, 4, 8, 16, 32, 64], lengths) if r * n <= args.budget]
    rows_x = []
    secs = []
    for r, n in shapes:
        s = time_pass(model, r, n, args.device, args.repeats)
        rows_x.append((r * n, r * n * n, 1.0))
        secs.append(s)
        print(f"  {r:>3} × {n:<5} {s * 1e3:9.2f} ms  {r * n / s:12,.0f} tokens/s", flush=True)
    x = np.array(rows_x, dtype=np.float64)
    y = np.array(secs)
    weights = 1 / y  # relative error: small passes count as much as large ones
    (a, b, c), *_ = np.linalg.lstsq(x * weights[:, None], y * weights, rcond=None)
    print(f"fit: {a * 1e6:.3f} µs/token + {b * 1e9:.4f} ns·rows·length² + {c * 1e3:.3f} ms/pass "
          f"({args.device}, {args.dtype}, {args.layers} layers, hidden {args.hidden}, {torch.get_num_threads()} threads)")
    print(f"pass overhead ≈ {c / a:,.0f} tokens")


if __name__ == "__main__":
    main()
