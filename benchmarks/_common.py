"""What the benchmark scripts share: backbones to time (the embedded model, or random-initialised
real-size architectures for GPUs, where nothing can be downloaded), prompts, and timers.

Timing does not depend on weight values, so a random Llama-3.1-8B in bf16 times like the real one.
A byte-level tokenizer built here stands in for the real tokenizer on machines without one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

from mlpm_guard.estimator.readings import select
from mlpm_guard.guardrail.scoring import refusal_line, strictest, tool_turns, views_of, with_tool_turns
from mlpm_guard.vocabulary.types import Verdict
from mlpm_guard.vocabulary.verdicts import make_verdict, tier_of
from mlpm_guard.toolkit.features import extract


@dataclass
class Item:
    prompt: Any          # a string or a message list
    label: int
    content: bool = False
    category: str | None = None  # the dataset's own category (harmful sets that carry one)

    @property
    def kind(self) -> str:
        return "content" if self.content else "request"


class Scorer:
    """States of every view of every item, extracted once through the feature cache, so any number
    of prototypes can be scored on them.

    Args:
        whole: also read each item whole, as one message (the ``message only`` column of a table).
    """

    def __init__(self, backbone: Any, items: Sequence[Item], poolings: Sequence[str] = ("last",), *,
                 whole: bool = True, desc: str = "hidden states") -> None:
        self.backbone = backbone
        self.poolings = tuple(poolings)
        self.views: dict[int, list[tuple[str, str]]] = {}  # (view name, text key) per item
        self.tool_turns: dict[int, list[Item]] = {}  # a request's tool turns, judged as content
        texts: dict[str, Any] = {}
        for item in items:
            views = views_of(backbone, item.prompt, kind=item.kind)
            self.views[id(item)] = [(v.name, json.dumps(v.as_messages())) for v in views]
            texts.update({k: json.loads(k) for _, k in self.views[id(item)]})
            # A request's tool turns are also judged as content (scoring.with_tool_turns).
            turns = [] if item.content else tool_turns(item.prompt)
            self.tool_turns[id(item)] = [Item(text, 1, True) for _, text in turns]
            for turn in self.tool_turns[id(item)]:
                self.views[id(turn)] = [(v.name, json.dumps(v.as_messages()))
                                        for v in views_of(backbone, turn.prompt, kind="content")]
                texts.update({k: json.loads(k) for _, k in self.views[id(turn)]})
            if whole:
                key = self.whole_key(item)
                texts[key] = json.loads(key)
        self.keys = list(texts)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.layers = list(range(1, backbone.num_layers + 1))
        self.H = extract(backbone, [texts[k] for k in self.keys], self.layers, poolings=self.poolings, desc=desc)

    @staticmethod
    def whole_key(item: Item) -> str:
        return json.dumps([{"role": "user", "content": item.prompt}] if isinstance(item.prompt, str) else item.prompt)

    def proba(self, prototypes: Any, items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """P(unsafe) per item, with views (as ``Guard.check`` decides) and from the whole prompt alone
        (``None`` unless read whole), and the line each item is refused from (``scoring.refusal_line``)."""
        kinds = {it.kind for it in items}
        # A head judges its own kind of text (Prototypes.for_kind).
        scorer = prototypes.for_kind(kinds.pop()) if len(kinds) == 1 else prototypes
        views, lines, p_all = self._strictest(scorer, items)
        turns = [(k, t) for k, it in enumerate(items) for t in self.tool_turns.get(id(it), [])]
        if turns:
            content = prototypes.for_kind("content")
            p_turn, line_turn, _ = self._strictest(content, [t for _, t in turns])
            judged: dict[int, list[tuple[int, Verdict]]] = {}
            for (k, _), p, line in zip(turns, p_turn, line_turn):
                tier = tier_of(p, line, content.controversial_threshold_)
                judged.setdefault(k, []).append((0, make_verdict(p, tier, threshold=line)))
            for k, turned in judged.items():
                tier = tier_of(views[k], lines[k], scorer.controversial_threshold_)
                views[k] = with_tool_turns(make_verdict(views[k], tier, threshold=lines[k]), turned).p_unsafe
        keys = [self.whole_key(it) for it in items]
        whole = np.array([p_all[self.index[k]] for k in keys]) if all(k in self.index for k in keys) else None
        return views, whole, lines

    def _strictest(self, prototypes: Any, items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The strictest view of each item, its refusal line, and every text's P(unsafe)."""
        p_all = prototypes.predict_proba(select(self.H, self.layers, prototypes.layer_ids_, self.poolings))[:, 1]
        lines = np.array([refusal_line(prototypes, it.prompt, kind=it.kind) for it in items])
        views = np.array([strictest([(name, p_all[self.index[k]]) for name, k in self.views[id(it)]],
                                    threshold=line, controversial=prototypes.controversial_threshold_)[1]
                          for it, line in zip(items, lines)])
        return views, lines, p_all


def probe(name: str) -> list[dict[str, Any]]:
    """Rows of one of the project's probe sets (``mlpm_guard/resources/probes/<name>.jsonl``; never fitted)."""
    ref = resources.files("mlpm_guard") / "resources" / "probes" / f"{name}.jsonl"
    return [json.loads(line) for line in ref.read_text(encoding="utf-8").splitlines() if line.strip()]


# Real-size Llama architectures (from their published configs), and a tiny one for smoke runs.
ARCHS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=True),
}

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Benign prompts of varied length, so the guard routes them all to PASS under the default policy too.
PROMPTS = [
    "What is the capital of Australia?",
    "Write a short poem about autumn leaves falling in a quiet park.",
    "Explain how photosynthesis works to a ten-year-old, in a few sentences.",
    "Give me three tips for staying focused while studying for exams.",
    "How do I sort a list of dictionaries by a key in Python?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Suggest a name for a small bakery that specialises in sourdough bread.",
    "What are the main differences between a virus and a bacterium?",
    "Plan a relaxing weekend trip to the seaside for two people on a budget.",
    "Describe the water cycle and why it matters for agriculture.",
    "Translate 'good morning, how are you today?' into Spanish and French.",
    "What should I consider when buying a second-hand bicycle?",
]


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with a ChatML template: ~1 token per character, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def random_backbone(arch: str, device: str, dtype: str) -> Any:
    """A :class:`~mlpm_guard.Backbone` over a random-initialised model of a real architecture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlpm_guard import Backbone

    if arch not in ARCHS:
        raise SystemExit(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(**ARCHS[arch], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # build the weights directly in the target dtype, on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return Backbone.from_model(model, tokenizer, name=f"random-{arch}")


def build_backbone(args: argparse.Namespace) -> Any:
    from mlpm_guard import Backbone

    if args.arch:
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        device = "cpu" if device == "auto" else device
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        return random_backbone(args.arch, device, dtype)
    return Backbone(args.backbone, device=args.device, dtype=args.dtype)


def prototypes_for(backbone: Any, n_per_label: int = 64) -> Any:
    """The default prototypes (shipped for the embedded backbone); for a random model, prototypes
    fitted on a slice of the seed set (their values are meaningless, their cost is the real one)."""
    from mlpm_guard import Prototypes
    from mlpm_guard.estimator.shipped import default_prototypes
    from mlpm_guard.toolkit.data import seed_examples
    from mlpm_guard.toolkit.training import DEFAULT_PARAMS

    if not backbone.name.startswith("random-"):
        return default_prototypes(backbone, progress=False)
    seeds = seed_examples()
    rows = [e for e in seeds if e.label == 0][:n_per_label] + [e for e in seeds if e.label == 1][:n_per_label]
    params = {k: v for k, v in DEFAULT_PARAMS.items() if k != "layers"}
    return Prototypes(**params).fit([e.prompt for e in rows], [e.label for e in rows], backbone=backbone)


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="embedded", help="model spec (default: the embedded SmolLM2-135M)")
    parser.add_argument("--arch", choices=sorted(ARCHS),
                        help="time a random-initialised model of this architecture instead of --backbone")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def synchronize(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def device_name(device: Any) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
