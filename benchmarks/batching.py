"""What length-sorted chunks buy ``Guard.batch`` on prompts of mixed length.

The same prompts are answered twice on one warm guard (every route sent to PASS): in chunks of
consecutive prompts, as callers hand them over, and in one ``Guard.batch`` call, which forms its
chunks by length so that one long prompt does not pad (and slow every decoding step of) its chunk.

    python benchmarks/batching.py --data ../shared/data/toxicchat.jsonl [--n 64] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import random
import time

from mlpm_guard import Guard
from mlpm_guard.toolkit.data import load_examples

ALL_PASS = {"safe_route": "pass", "controversial_route": "pass", "unsafe_route": "pass", "allow_pass_for_unsafe": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a labelled JSONL/CSV file with prompts of mixed length")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts = [e.prompt for e in load_examples(args.data)]
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[: args.n]
    guard = Guard()
    size = guard.backbone.config.batch_size
    guard.batch(prompts[:4], policy=ALL_PASS, max_new_tokens=4)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), size):
        guard.batch(prompts[i:i + size], policy=ALL_PASS, max_new_tokens=args.max_new_tokens)
    consecutive = time.perf_counter() - start
    start = time.perf_counter()
    guard.batch(prompts, policy=ALL_PASS, max_new_tokens=args.max_new_tokens)
    sorted_ = time.perf_counter() - start
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens: consecutive chunks {consecutive:.1f} s "
          f"({len(prompts) / consecutive:.2f}/s), length-sorted {sorted_:.1f} s ({len(prompts) / sorted_:.2f}/s), "
          f"{consecutive / sorted_:.2f}x")


if __name__ == "__main__":
    main()
