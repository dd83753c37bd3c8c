"""What guarding costs on top of plain generation: the same prompts and token budget through plain
``model.generate`` and through the guard's PASS route, side by side in one run.

The guard scores each prompt from the prefill that starts its answer and continues from that
prefill's KV cache, so for a one-sentence prompt the only extra work is the prototype maths. A
longer request is also read in parts (its latest turn alone, each sentence: :mod:`mlpm_guard.guardrail.views`),
one more forward pass per reading; ``--prompts-from`` times real prompts that have them. Runs are interleaved (the order
alternates per prompt and repeat) so that drift in machine speed hits both sides alike.

    python benchmarks/overhead.py --json                     # CPU, embedded SmolLM2-135M
    python benchmarks/overhead.py --prompts-from ../shared/data/chat_prompts.jsonl --json  # real chat prompts
    python benchmarks/overhead.py --arch llama-3.1-8b --json # GPU, random-initialised 8B in bf16

The last line with ``--json`` is one JSON object: ``ratio`` (guarded PASS time / plain generate
time), ``ratio_same_loop`` (against the guard's own decoding loop without scoring), ``device``,
``backbone``, ``n_prompts``, ``readings_per_prompt`` (mean), ``max_new_tokens`` and the raw timings.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PROMPTS, add_backbone_args, build_backbone, device_name, emit, prototypes_for, timed  # noqa: E402

from mlpm_guard import GenerationConfig, Guard, Policy  # noqa: E402
from mlpm_guard.model.generation import decode, prefill  # noqa: E402
from mlpm_guard.guardrail.scoring import views_of  # noqa: E402
from mlpm_guard.toolkit.data import load_examples  # noqa: E402

ALWAYS_PASS = Policy(safe_route="pass", controversial_route="pass", unsafe_route="pass", allow_pass_for_unsafe=True)


def plain_generate(backbone, prompt: str, max_new_tokens: int) -> int:
    """Plain transformers generation (the guard's layer hooks exist only inside its own calls)."""
    batch = backbone.collate(backbone.encode([prompt]))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = backbone.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=backbone.tokenizer.pad_token_id)
    new = out[0, batch["input_ids"].shape[1]:].tolist()
    return next((i for i, t in enumerate(new) if t in backbone.eos_token_ids), len(new))


def same_loop(backbone, prompt: str, config: GenerationConfig) -> int:
    """The guard's own prefill-and-decode loop without any scoring."""
    state = prefill(backbone, backbone.encode([prompt]))
    n = 0
    for token in decode(backbone, state, config):
        if int(token[0]) in backbone.eos_token_ids:
            break
        n += 1
    return n


def real_prompts(path: str, n: int, max_words: int = 160) -> list[str]:
    """A seeded sample of ``n`` safe prompts of at most ``max_words`` words from a labelled file."""
    pool = [e.prompt for e in load_examples(path)
            if e.label == 0 and isinstance(e.prompt, str) and len(e.prompt.split()) <= max_words]
    return random.Random(0).sample(pool, min(n, len(pool)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    parser.add_argument("--n-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts-from", metavar="JSONL",
                        help="time a seeded sample of --n-prompts safe prompts from this labelled file (JSONL/CSV) instead of the built-in ones")
    args = parser.parse_args(argv)

    backbone = build_backbone(args)
    guard = Guard(backbone, prototypes_for(backbone), ALWAYS_PASS,
                  generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
    config = guard.generation
    if args.prompts_from:
        prompts = real_prompts(args.prompts_from, args.n_prompts)
    else:
        prompts = (PROMPTS * (args.n_prompts // len(PROMPTS) + 1))[: args.n_prompts]
    readings = [len(views_of(backbone, p)) for p in prompts]
    dev = backbone.device

    runs = {
        "plain": lambda p: plain_generate(backbone, p, args.max_new_tokens),
        "same_loop": lambda p: same_loop(backbone, p, config),
        "guarded": lambda p: guard.invoke(p).timings.completion_tokens,
    }
    for fn in runs.values():  # warm-up: kernels, allocator, caches
        fn(prompts[0])

    seconds = {k: 0.0 for k in runs}
    tokens = {k: 0 for k in runs}
    mismatched = 0
    for r in range(args.repeats):
        for i, p in enumerate(prompts):
            names = list(runs)
            if (r + i) % 2:
                names.reverse()
            counts = {}
            for name in names:
                dt, n = timed(lambda name=name: runs[name](p), dev)
                seconds[name] += dt
                tokens[name] += n
                counts[name] = n
            mismatched += len(set(counts.values())) > 1

    result = {
        "ratio": seconds["guarded"] / seconds["plain"],
        "ratio_same_loop": seconds["guarded"] / seconds["same_loop"],
        # In bf16, plain `generate` and the guard's loop can round a prompt onto different tokens
        # and stop at different lengths; time per token compares the two when counts differ.
        "ratio_per_token": (seconds["guarded"] / max(tokens["guarded"], 1))
        / (seconds["plain"] / max(tokens["plain"], 1)),
        "device": device_name(dev),
        "backbone": backbone.name,
        "dtype": str(backbone.dtype).replace("torch.", ""),
        "n_prompts": len(prompts),
        "prompts_from": args.prompts_from,
        "readings_per_prompt": sum(readings) / len(readings),
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "prototype_layers": guard.prototypes.layer_ids_,
        "seconds": seconds,
        "tokens": tokens,
        "runs_with_different_token_counts": mismatched,
    }
    print(f"device {result['device']}, backbone {result['backbone']} ({result['dtype']}), "
          f"{len(prompts)} prompts x {args.repeats} repeats, max_new_tokens {args.max_new_tokens}, "
          f"{result['readings_per_prompt']:.2f} readings per prompt")
    for name in runs:
        ms_tok = 1000 * seconds[name] / max(tokens[name], 1)
        print(f"  {name:10s} {seconds[name]:8.2f} s  {tokens[name]:6d} tokens  {ms_tok:7.2f} ms/token")
    print(f"  ratio guarded/plain generate = {result['ratio']:.4f} (per token {result['ratio_per_token']:.4f}); "
          f"guarded/same loop unguarded = {result['ratio_same_loop']:.4f}")
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
