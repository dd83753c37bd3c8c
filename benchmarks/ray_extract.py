"""Ray Data extraction throughput (``fit|eval --engine ray``): 1 actor against 2, next to the local engine.

Extracts the last-token states of every layer (what ``fit`` reads) for the same prompts three
ways: in this process, and on a local Ray instance with 1 and with 2 actors (one backbone each,
``--actor-threads`` torch threads each). Ray times include starting the actors and loading a
backbone in each, as a real ``--engine ray`` run pays them.

    python benchmarks/ray_extract.py [--data FILE.jsonl] [--n 256] --json

The GPU line is a projection, not a measurement: actors share nothing but the input queue and
send back depth x hidden float32 per prompt, so N GPU actors should give about N times one GPU
actor's rate until the driver's collection of those states becomes the bottleneck. On a 2-core
machine, 2 CPU actors can at best double 1 actor's rate only when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from mlpm_guard import Backbone
from mlpm_guard.toolkit import ray_engine
from mlpm_guard.toolkit.data import load_examples, seed_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="*", default=[], help="labelled files (default: the built-in seed set)")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--actor-threads", type=int, default=1, help="torch threads per actor (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    examples = [e for path in args.data for e in load_examples(path)] or seed_examples()
    prompts = [e.prompt for e in examples]
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[: args.n]

    backbone = Backbone()
    layers = list(range(1, backbone.num_layers + 1))
    backbone.hidden_states(prompts[:4], layers)  # warm-up
    start = time.perf_counter()
    backbone.hidden_states(prompts, layers)
    local_s = time.perf_counter() - start
    result = {"benchmark": "ray_extract", "n_prompts": len(prompts), "layers": len(layers),
              "cpu_count": os.cpu_count(), "local_threads": torch.get_num_threads(),
              "local": {"seconds": round(local_s, 2), "prompts_per_s": round(len(prompts) / local_s, 2)},
              "load_average_1min": [os.getloadavg()[0]]}
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for actors in (1, 2):
            options = ray_engine.RayOptions(actors=actors, threads=args.actor_threads)
            _, stats = ray_engine.extract(backbone, prompts, layers, options)
            result[f"ray_{actors}_actor{'s' if actors > 1 else ''}"] = {
                "seconds": round(stats.seconds, 2), "prompts_per_s": round(stats.prompts_per_s, 2),
                "batches": stats.batches, "threads_per_actor": args.actor_threads}
            print(f"ray, {actors} actor(s): {stats.prompts_per_s:.1f} prompts/s ({stats.seconds:.1f} s)",
                  file=sys.stderr)
    finally:
        ray.shutdown()
    r1, r2 = result["ray_1_actor"]["prompts_per_s"], result["ray_2_actors"]["prompts_per_s"]
    efficiency = r2 / (2 * r1)
    result["speedup_2_vs_1_actor"] = round(r2 / r1, 2)
    result["scaling_efficiency"] = round(efficiency, 2)
    per_prompt_kb = len(layers) * backbone.hidden_size * 4 / 1024
    result["projection"] = (f"PROJECTION, not measured: N GPU actors ~ N x (one GPU actor's prompts/s), since actors "
                            f"share only the input queue; each prompt sends {per_prompt_kb:.0f} KiB of states back to "
                            "the driver, which bounds the total at high N. No GPU was measured.")
    result["load_average_1min"].append(os.getloadavg()[0])
    print(f"local {result['local']['prompts_per_s']} prompts/s; ray 1 actor {r1}, 2 actors {r2} "
          f"({r2 / r1:.2f}x)", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
