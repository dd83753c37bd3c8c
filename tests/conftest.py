"""Shared fixtures: the real embedded backbone (CPU) and a tiny random Llama for fast mechanics tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def backbone():
    from mlpm_guard import Backbone

    return Backbone()


@pytest.fixture(scope="session")
def tiny_backbone(backbone):
    """A 4-layer random Llama with the embedded tokenizer: same mechanics, milliseconds per call."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlpm_guard import Backbone

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(backbone.tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=backbone.tokenizer.pad_token_id,
                         eos_token_id=backbone.tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    return Backbone.from_model(model, backbone.tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def seed_prototypes(backbone):
    from mlpm_guard.training import default_prototypes

    return default_prototypes(backbone, progress=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
