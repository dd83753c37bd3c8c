"""Scoring speed: early exit, the fast CPU path, load times, and (on a CUDA machine) GPU throughput.

CPU (default, embedded SmolLM2-135M): the same labelled prompts are scored by each variant, side by
side in one run:

  naive      full model, fp32, ``output_hidden_states=True`` (lm_head over every position)
  full       mlpm-guard's pass without early exit (all layers, no lm_head), fp32
  early      + stop after the deepest layer the prototypes use
  prefix     + reuse the KV cache of the chat template's shared opening (the default path)
  bf16       + bfloat16 weights and activations
  int8       + int8 dynamic quantisation of the linear layers (fp32 activations)
  shallow    the prefix path with prototypes whose candidate layers are the first half only
             (the fitting option for early exit: ``mlpm-guard fit --layers 1-15``)

Quality: prototypes are fitted on half of the built-in seed set with reference (``full``) states and
evaluated on the other half with each variant's states; ``f1_delta`` is variant minus reference
(``--data FILE`` evaluates the default prototypes on your labelled files instead). The fast path
is the quickest variant whose F1 is within 0.01 of the reference.

GPU (``--arch llama-3.1-8b`` on a CUDA machine; weights random, timing real): score-only throughput
in tokens/s and its fraction of the measured bf16 matmul peak, early-exit speed-up, and the prefill
cost of a separate 1B and 8B guard model on the same prompts.

    python benchmarks/speed.py --json
    python benchmarks/speed.py --arch llama-3.1-8b --json      # on a GPU

The last line with ``--json`` is one JSON object with at least ``early_exit_speedup``,
``cpu_fast_path_speedup``, ``cpu_fast_path_f1_delta``, ``prompts_per_s`` and ``device``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ARCHS,
    PROMPTS,
    add_backbone_args,
    device_name,
    emit,
    random_backbone,
    timed,
)

from mlpm_guard import Backbone, Prototypes, resolve_dtype  # noqa: E402
from mlpm_guard.estimator.shipped import default_prototypes  # noqa: E402
from mlpm_guard.model.forward import PrefixCache  # noqa: E402
from mlpm_guard.toolkit.data import Example, load_examples, seed_examples  # noqa: E402
from mlpm_guard.toolkit.metrics import moderation_metrics  # noqa: E402
from mlpm_guard.toolkit.training import DEFAULT_PARAMS  # noqa: E402


# ---------------------------------------------------------------------- CPU variants
def naive_states(backbone: Backbone, rows, layers) -> np.ndarray:
    """The straightforward way: the full causal LM with output_hidden_states, fp32."""
    out = np.empty((len(rows), len(layers), backbone.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for idx in backbone.batches([len(r) for r in rows]):
            batch = backbone.collate([rows[i] for i in idx])
            hs = backbone.model(**batch, output_hidden_states=True).hidden_states
            out[idx] = torch.stack([hs[layer][:, -1] for layer in layers], dim=1).float().numpy()
    return out


def variant(backbone: Backbone, *, prefix: bool) -> Backbone:
    """A shallow copy of the backbone sharing its model, with the prefix cache on or off."""
    other = copy.copy(backbone)
    other.config = backbone.config.model_copy(update={"prefix_cache": prefix})
    other.prefix = PrefixCache()
    return other


def int8_backbone(backbone: Backbone) -> Backbone:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_dynamic(backbone.model, {torch.nn.Linear}, dtype=torch.qint8)
    return Backbone.from_model(model, backbone.tokenizer, name=backbone.name + "-int8")


def labelled(args: argparse.Namespace) -> tuple[list[Example], list[Example]]:
    """(fit, eval) examples: halves of the seed set, or (none, the given files)."""
    if args.data:
        return [], [e for path in args.data for e in load_examples(path)][: args.n]
    seeds = seed_examples()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(seeds))
    half = len(seeds) // 2
    fit = [seeds[i] for i in order[:half]]
    ev = [seeds[i] for i in order[half:]][: args.n]
    return fit, ev


def cpu_report(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    backbone = Backbone(args.backbone, device="cpu", dtype="float32")
    warm_load_s = time.perf_counter() - start
    fit_rows, eval_rows = labelled(args)
    if fit_rows:
        all_layers = list(range(1, backbone.num_layers + 1))
        H = backbone.last_token_states(backbone.encode([e.prompt for e in fit_rows]), all_layers)
        params = {k: v for k, v in DEFAULT_PARAMS.items() if k != "layers"}
        prototypes = Prototypes(**params).fit(H, [e.label for e in fit_rows], backbone=backbone)
        # The fitting option that prefers shallow layers: candidates restricted to the first half.
        half = list(range(1, backbone.num_layers // 2 + 1))
        shallow = Prototypes(**{**params, "layers": half}).fit(H[:, : len(half)], [e.label for e in fit_rows],
                                                               backbone=backbone)
    else:
        prototypes = default_prototypes(backbone, progress=False)
        shallow = None
    layers = prototypes.layer_ids_
    y = [e.label for e in eval_rows]
    rows = backbone.encode([e.prompt for e in eval_rows])
    n_tokens = sum(len(r) for r in rows)

    plain = variant(backbone, prefix=False)
    fast = variant(backbone, prefix=True)
    bf16 = Backbone(args.backbone, device="cpu", dtype="bfloat16")
    int8 = int8_backbone(plain)
    full_layers = list(range(1, backbone.num_layers + 1))
    runs = {
        "naive": lambda: naive_states(plain, rows, full_layers)[:, [layer - 1 for layer in layers]],
        "full": lambda: plain.last_token_states(rows, full_layers)[:, [layer - 1 for layer in layers]],
        "early": lambda: plain.last_token_states(rows, layers),
        "prefix": lambda: fast.last_token_states(rows, layers),
        "bf16": lambda: bf16.last_token_states(rows, layers),
        "int8": lambda: int8.last_token_states(rows, layers),
    }
    if shallow is not None:
        runs["shallow"] = lambda: fast.last_token_states(rows, shallow.layer_ids_)
    for fn in runs.values():  # warm-up on a few rows: allocator, oneDNN kernels, prefix cache
        saved = rows[:]
        rows[:] = saved[:4]
        fn()
        rows[:] = saved
    seconds = {k: [] for k in runs}
    states = {}
    for r in range(args.repeats):
        names = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in names:
            dt, states[name] = timed(runs[name], "cpu")
            seconds[name].append(dt)
    best = {k: min(v) for k, v in seconds.items()}
    scorer = {k: prototypes for k in runs} | ({"shallow": shallow} if shallow is not None else {})
    f1 = {k: moderation_metrics(y, scorer[k].predict_proba(states[k])[:, 1], scorer[k].threshold_)["f1"] for k in runs}
    reference = f1["full"]
    rows_out = {k: {"seconds": best[k], "prompts_per_s": len(rows) / best[k], "tokens_per_s": n_tokens / best[k],
                    "speedup_vs_naive": best["naive"] / best[k], "f1": f1[k], "f1_delta": f1[k] - reference}
                for k in runs}
    ok = [k for k in runs if k not in ("naive", "full", "shallow") and abs(rows_out[k]["f1_delta"]) <= 0.01]
    fast_path = min(ok, key=lambda k: best[k]) if ok else "early"

    cold = None
    if args.cold_load:
        import os
        import shutil
        import tempfile

        # A fresh cache root: the GGUF is converted again, as on a user's first run.
        tmp = tempfile.mkdtemp()
        saved = os.environ.get("MLPM_GUARD_CACHE")
        os.environ["MLPM_GUARD_CACHE"] = tmp
        try:
            cold, _ = timed(lambda: Backbone(args.backbone), "cpu")
        finally:
            if saved is None:
                os.environ.pop("MLPM_GUARD_CACHE", None)
            else:
                os.environ["MLPM_GUARD_CACHE"] = saved
            shutil.rmtree(tmp, ignore_errors=True)

    single = []
    one = rows[:1]
    served_by = {"bf16": bf16, "int8": int8}.get(fast_path, fast)
    for _ in range(args.latency_runs):
        dt, _ = timed(lambda: served_by.last_token_states(one, layers), "cpu")
        single.append(dt * 1000)

    return {
        "device": device_name("cpu"),
        "backbone": backbone.name,
        "n_prompts": len(rows),
        "mean_prompt_tokens": n_tokens / len(rows),
        "layers": layers,
        "variants": rows_out,
        "cpu_fast_path": fast_path,
        "cpu_fast_path_speedup": rows_out[fast_path]["speedup_vs_naive"],
        "cpu_fast_path_f1_delta": rows_out[fast_path]["f1_delta"],
        "early_exit_speedup": best["full"] / best["early"],
        "shallow_layers": shallow.layer_ids_ if shallow is not None else None,
        "shallow_speedup_vs_prefix": best["prefix"] / best["shallow"] if shallow is not None else None,
        "prompts_per_s": rows_out[fast_path]["prompts_per_s"],
        "tokens_per_s": rows_out[fast_path]["tokens_per_s"],
        "latency_ms_p50": float(np.percentile(single, 50)),
        "latency_ms_p95": float(np.percentile(single, 95)),
        # What `Backbone()` picks on this CPU ("auto"): the fast path users get without asking.
        "default_dtype": str(resolve_dtype("auto", torch.device("cpu"))).replace("torch.", ""),
        "load_s_warm": warm_load_s,
        "load_s_cold": cold,
    }


def print_cpu(result: dict[str, Any]) -> None:
    print(f"device {result['device']}, backbone {result['backbone']}, {result['n_prompts']} prompts "
          f"(mean {result['mean_prompt_tokens']:.0f} tokens), prototype layers {result['layers']}")
    print(f"  {'variant':8s} {'s':>7s} {'prompts/s':>10s} {'tokens/s':>9s} {'x naive':>8s} {'F1':>6s} {'dF1':>7s}")
    for name, v in result["variants"].items():
        print(f"  {name:8s} {v['seconds']:7.2f} {v['prompts_per_s']:10.1f} {v['tokens_per_s']:9.0f} "
              f"{v['speedup_vs_naive']:8.2f} {v['f1']:6.3f} {v['f1_delta']:+7.3f}")
    print(f"  fast path: {result['cpu_fast_path']} ({result['cpu_fast_path_speedup']:.2f}x naive, "
          f"dF1 {result['cpu_fast_path_f1_delta']:+.3f}); early exit {result['early_exit_speedup']:.2f}x full depth")
    print(f"  one prompt: p50 {result['latency_ms_p50']:.0f} ms, p95 {result['latency_ms_p95']:.0f} ms; load warm "
          f"{result['load_s_warm']:.1f} s" + (f", cold {result['load_s_cold']:.1f} s" if result["load_s_cold"] else ""))


# ---------------------------------------------------------------------- GPU
def layer_flops_per_token(arch: dict[str, Any], context: int) -> float:
    """Forward FLOPs of one decoder layer per token (matmuls and attention scores)."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    kv = h * arch["num_key_value_heads"] // arch["num_attention_heads"]
    params = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o, k, v, gate/up/down
    return 2 * params + 4 * context * h


def matmul_peak_tflops(device: str) -> float:
    n = 8192 if device.startswith("cuda") else 1024  # a CPU smoke run should not take minutes
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device)[0] for _ in range(10)]
    return 2 * n**3 / float(np.median(times)) / 1e12


def gpu_report(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if args.device == "auto" else args.device
    backbone = random_backbone(args.arch, device, "bfloat16")
    arch = ARCHS[args.arch]
    prompts = (PROMPTS * (args.n // len(PROMPTS) + 1))[: args.n]
    rows = backbone.encode(prompts)
    tokens = sum(len(r) for r in rows)
    depth_full = backbone.num_layers
    depth_early = max(1, round(0.6 * depth_full))  # a typical deepest kept layer
    for depth in (depth_full, depth_early):
        backbone.last_token_states(rows[:8], [depth])
    t_full = min(timed(lambda: backbone.last_token_states(rows, [depth_full]), device)[0] for _ in range(args.repeats))
    t_early = min(timed(lambda: backbone.last_token_states(rows, [depth_early]), device)[0]
                  for _ in range(args.repeats))
    mean_len = tokens / len(rows)
    flops = tokens * layer_flops_per_token(arch, int(mean_len)) * depth_full
    peak = matmul_peak_tflops(device)
    guard_models = {}
    for name in args.guard_models.split(","):
        other = backbone if name == args.arch else random_backbone(name, device, "bfloat16")
        other_rows = other.encode(prompts)

        def prefill_all(bb=other, rs=other_rows) -> None:
            with torch.inference_mode():
                for idx in bb.batches([len(r) for r in rs]):
                    bb.model(**bb.collate([rs[i] for i in idx]), logits_to_keep=1)

        prefill_all()
        guard_models[name] = min(timed(prefill_all, device)[0] for _ in range(args.repeats)) / len(rows) * 1000
        if other is not backbone:
            del other
            torch.cuda.empty_cache()
    return {
        "device": device_name(device),
        "backbone": backbone.name,
        "n_prompts": len(rows),
        "mean_prompt_tokens": mean_len,
        "score_tokens_per_s": tokens / t_full,
        "prompts_per_s": len(rows) / t_early,
        "fraction_of_bf16_peak": flops / t_full / 1e12 / peak,
        "measured_bf16_peak_tflops": peak,
        "early_exit_depth": [depth_early, depth_full],
        "early_exit_speedup": t_full / t_early,
        "separate_guard_prefill_ms_per_prompt": guard_models,
        "cpu_fast_path_speedup": None,
        "cpu_fast_path_f1_delta": None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    parser.add_argument("--n", type=int, default=256, help="prompts to score")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--data", nargs="*", help="labelled files for the quality check (default: seed-set halves)")
    parser.add_argument("--cold-load", action="store_true", help="also time a first load into an empty cache")
    parser.add_argument("--guard-models", default="llama-3.2-1b,llama-3.1-8b",
                        help="with --arch: the separate guard models whose prefill is the reference (comma-separated)")
    args = parser.parse_args(argv)
    if args.arch:
        result = gpu_report(args)
        print(f"device {result['device']}, {result['backbone']}: {result['score_tokens_per_s']:.0f} tokens/s "
              f"({100 * result['fraction_of_bf16_peak']:.1f}% of {result['measured_bf16_peak_tflops']:.0f} TFLOP/s), "
              f"early exit {result['early_exit_speedup']:.2f}x; separate guard prefill ms/prompt "
              f"{result['separate_guard_prefill_ms_per_prompt']}")
    else:
        result = cpu_report(args)
        print_cpu(result)
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
