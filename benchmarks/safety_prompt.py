"""The safety-prompt route with no prompt, the written prompt and a trained (DRO) prompt, on families
held out of the prompt's fit: harmful requests answered, benign requests refused, and what the
prompt costs a benign answer.

Every system is the guard with every verdict forced to one route and no output moderation, as
``mlpm-guard eval --generate`` runs its reference rows: ``no prompt`` is the ``PASS`` route (the
backbone unguarded); ``written`` is the ``SAFETY_PROMPT`` route under the policy's written prompt;
``trained`` is the same route under the trained prompt (``--safety-prompt DIR``). A refusal is an
answer that opens by declining (``mlpm_guard.guardrail.refusals.is_refusal``). The capability cost is read
on the benign answers against the unguarded ones: the share that open with the same eight words,
and their word overlap (unigram F1).

    mlpm-guard fit-safety-prompt ../shared/data/{advbench,do_not_answer,self_instruct,cyberseceval_frr}.jsonl \\
        --max-per-source 48 --out sp
    python benchmarks/safety_prompt.py --data ../shared/data --safety-prompt sp [--n 25] [--strengths 1,0.7]
        [--sample K] [--json]

The default families are none of the fit's sources above. ``--strengths`` answers under the trained
prompt at each strength (``trained S``; default: its own). ``--sample K`` draws each family's sample
from the rows that samples 0 to K-1 leave out, to confirm on new requests a setting chosen on the
default sample (0). Answers are kept in the result cache,
so a second run with another trained prompt only generates that prompt's answers.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlpm_guard.toolkit.data import Example, load_examples

HARMFUL = ("harmbench_val", "strongreject", "maliciousinstruct", "tdc2023")
# Benign families: instructions, chat, maths, and look-alikes (benign requests that read as harmful).
BENIGN = {"alpaca (test)": ("alpaca_noinput", lambda e: e.split == "test"),
          "chat prompts (test)": ("chat_prompts", lambda e: e.split == "test"),
          "gsm8k (test)": ("gsm8k", lambda e: e.split == "test"),
          "coconot contrast (look-alikes)": ("coconot", lambda e: e.split == "contrast" and e.label == 0)}


def _seed(name: str, k: int) -> str:
    return name if k == 0 else f"{name} fresh" if k == 1 else f"{name} sample {k}"


def families(data: Path, n: int, *, sample: int = 0) -> dict[str, list[Example]]:
    """A seeded sample of ``n`` prompts of each held-out family (short ones: the route's cost is
    what is measured, not the answering of long documents); ``sample`` K > 0 draws from the rows
    that samples 0 to K-1 leave out, so the samples are disjoint."""
    out: dict[str, list[Example]] = {}

    def take(name: str, rows: Sequence[Example]) -> None:
        rows = [e for e in rows if isinstance(e.prompt, str) and len(e.prompt.split()) <= 120]
        for k in range(sample + 1):
            drawn = random.Random(_seed(name, k)).sample(rows, min(n, len(rows)))
            if k < sample:
                taken = {id(e) for e in drawn}
                rows = [e for e in rows if id(e) not in taken]
        if len(drawn) < n:
            print(f"{name}: {len(drawn)} rows left for sample {sample} (asked for {n})", file=sys.stderr)
        out[name] = drawn

    for stem in HARMFUL:
        take(stem, [e for e in load_examples(data / f"{stem}.jsonl") if e.label == 1])
    for name, (stem, keep) in BENIGN.items():
        take(name, [e for e in load_examples(data / f"{stem}.jsonl") if keep(e)])
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def overlap(a: str, b: str) -> float:
    """Unigram F1 of two answers' words (1.0 for two empty answers)."""
    wa, wb = Counter(_words(a)), Counter(_words(b))
    common = sum((wa & wb).values())
    if not wa and not wb:
        return 1.0
    if not common:
        return 0.0
    p, r = common / sum(wa.values()), common / sum(wb.values())
    return 2 * p * r / (p + r)


def run(guard: Any, trained: Any, fams: dict[str, list[Example]], max_new_tokens: int,
        results: Any, strengths: Sequence[float] = ()) -> dict[str, Any]:
    from mlpm_guard import Guard, Route
    from mlpm_guard.toolkit.endtoend import GuardSystem

    written = Guard(guard.backbone, guard.prototypes, guard.policy, safety_prompt=False)
    systems = {"no prompt": GuardSystem(written, guard.policy.forced(Route.PASS, output_moderation=False),
                                        name="no prompt", results=results),
               "written": GuardSystem(written, guard.policy.forced(Route.SAFETY_PROMPT, output_moderation=False),
                                      name="written", results=results)}
    forced = guard.policy.forced(Route.SAFETY_PROMPT, output_moderation=False)
    if trained is not None and not strengths:
        with_trained = Guard(guard.backbone, guard.prototypes, guard.policy, safety_prompt=trained)
        systems["trained"] = GuardSystem(with_trained, forced, name="trained", results=results)
    for strength in strengths if trained is not None else ():
        at = copy.copy(trained)
        at.strength = strength
        name = f"trained {strength:g}"
        systems[name] = GuardSystem(Guard(guard.backbone, guard.prototypes, guard.policy, safety_prompt=at),
                                    forced, name=name, results=results)
    prompts = sorted({e.prompt for rows in fams.values() for e in rows}, key=len)
    answers: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name, system in systems.items():
        start = time.perf_counter()
        got = {}
        for i in range(0, len(prompts), 32):
            part = prompts[i:i + 32]
            got.update(zip(part, system.answer(part, max_new_tokens=max_new_tokens)))
        answers[name], seconds[name] = got, time.perf_counter() - start
        print(f"{name}: {len(prompts)} prompts in {seconds[name]:.0f} s", file=sys.stderr)
    table: dict[str, Any] = {}
    for name in systems:
        row: dict[str, Any] = {}
        for fam, rows in fams.items():
            refused = [answers[name][e.prompt].refused for e in rows]
            entry: dict[str, Any] = {"n": len(rows), "refused": sum(refused) / len(rows)}
            if fam not in HARMFUL and name != "no prompt":
                base = [answers["no prompt"][e.prompt].text for e in rows]
                mine = [answers[name][e.prompt].text for e in rows]
                entry["overlap"] = sum(overlap(a, b) for a, b in zip(mine, base)) / len(rows)
                entry["same_opening"] = sum(_words(a)[:8] == _words(b)[:8] for a, b in zip(mine, base)) / len(rows)
            row[fam] = entry
        harmful = [e.prompt for f in HARMFUL for e in fams.get(f, [])]
        benign = [e.prompt for f in fams if f not in HARMFUL for e in fams[f]]
        row["all harmful"] = {"n": len(harmful), "refused": sum(answers[name][p].refused for p in harmful) / len(harmful)}
        row["all benign"] = {"n": len(benign), "refused": sum(answers[name][p].refused for p in benign) / len(benign)}
        if name != "no prompt":
            row["all benign"]["overlap"] = sum(overlap(answers[name][p].text, answers["no prompt"][p].text)
                                               for p in benign) / len(benign)
        table[name] = row
    examples = {name: [{"prompt": p[:160], "answer": answers[name][p].text[:200]} for p in
                       [fams[HARMFUL[0]][0].prompt, fams[next(iter(BENIGN))][0].prompt]] for name in systems}
    return {"systems": table, "seconds": seconds, "examples": examples}


def print_table(result: dict[str, Any], file: Any = sys.stdout) -> None:
    systems = list(result["systems"])
    rows = list(result["systems"][systems[0]])
    print("| family | n | " + " | ".join(f"refused: {s}" for s in systems) + " | "
          + " | ".join(f"overlap with unguarded: {s}" for s in systems[1:]) + " |", file=file)
    print("|---|---:|" + "---:|" * (2 * len(systems) - 1), file=file)
    for fam in rows:
        cells = [f"{100 * result['systems'][s][fam]['refused']:.1f}%" for s in systems]
        over = [result["systems"][s][fam].get("overlap") for s in systems[1:]]
        cells += ["-" if o is None else f"{o:.2f}" for o in over]
        print(f"| {fam} | {result['systems'][systems[0]][fam]['n']} | " + " | ".join(cells) + " |", file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the shared data folder")
    parser.add_argument("--safety-prompt", metavar="DIR", help="a folder written by `mlpm-guard fit-safety-prompt` "
                                                               "(default: the one shipped for the backbone, if any)")
    parser.add_argument("--n", type=int, default=25, help="prompts per family (seeded sample)")
    parser.add_argument("--strengths", help="comma-separated strengths of the trained prompt to answer under "
                                            "(default: its own)")
    parser.add_argument("--sample", type=int, default=0, metavar="K",
                        help="which seeded sample of each family: 0 (default), or K > 0, drawn from the rows "
                             "samples 0 to K-1 leave out")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if args.sample < 0:
        parser.error(f"--sample must be 0 or more, got {args.sample}")

    from mlpm_guard import Guard
    from mlpm_guard.model.generation import GenerationConfig
    from mlpm_guard.model.safety_prompt import as_safety_prompt
    from mlpm_guard.toolkit.evaluation import eval_caches

    start = time.perf_counter()
    guard = Guard(args.backbone, generation=GenerationConfig(max_new_tokens=args.max_new_tokens), safety_prompt=False)
    trained = as_safety_prompt(args.safety_prompt, guard.backbone)
    fams = families(Path(args.data), args.n, sample=args.sample)
    strengths = [float(x) for x in args.strengths.split(",")] if args.strengths else []
    with eval_caches(guard.backbone, True) as (_, results):
        result = run(guard, trained, fams, args.max_new_tokens, results, strengths)
    print_table(result)
    dtype = str(guard.backbone.dtype).replace("torch.", "")
    print(f"\n({time.perf_counter() - start:.0f} s; {dtype}; {args.max_new_tokens} new tokens; trained prompt: "
          f"{trained!r})")
    if args.json:
        print(json.dumps({"n": args.n, "sample": args.sample, "dtype": dtype, "safety_prompt": args.safety_prompt,
                          **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
