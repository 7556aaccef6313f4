"""A merged Llama-family model as one GGUF file (F16, BF16 or Q8_0) that llama.cpp, Ollama and ModelWorks'
own `gguf:` source read: the `gguf` package's writer, llama.cpp's tensor names and metadata keys, and the
tokenizer (a byte-level BPE vocabulary, its merges, special tokens) with the chat template.

llama.cpp keeps the query and key projections in Meta's rotary layout, in which the two halves of each
head are interleaved; Hugging Face checkpoints hold them permuted, so they are permuted back here, as
llama.cpp's converter does (and transformers undoes when it reads the file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from shared.errors import FailedPrecondition

ARCHITECTURES = ("llama",)  # config.json model_type values this writer maps
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values


def write_gguf(model, tokenizer_dir: Path, path: Path, gguf_type: str) -> None:
    """Write `model` (a merged transformers LlamaForCausalLM) and the tokenizer in `tokenizer_dir` to `path`."""
    import gguf

    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise FailedPrecondition(
            f"GGUF export maps the {', '.join(ARCHITECTURES)} architecture; this model is {config.model_type!r}: "
            "export it merged (safetensors) and convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_config(writer, config, gguf_type)
    _write_tokenizer(writer, tokenizer_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in _llama_tensors(model):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise FailedPrecondition(f"the model has a tensor GGUF has no name for: {name}")
        data, qtype = _encode(tensor, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_config(writer, config, gguf_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or "modelworks-export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(file_types.get(gguf_type, gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0


def _write_tokenizer(writer, folder: Path) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens by id, their types, merges, special
    token ids and the chat template."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise FailedPrecondition(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style); this model's tokenizer is "
            f"{model.get('type')!r}: export it merged (safetensors) instead"
        )
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, token in added.items():
        vocab.setdefault(token["content"], token_id)
    size = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        token = added.get(token_id)
        if token is None:
            types[token_id] = gguf.TokenType.NORMAL
        else:
            types[token_id] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)  # merges, special ids, chat template
    special.add_to_gguf(writer)


def _byte_level(pre: dict | None) -> bool:
    if pre is None:
        return False
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _pre_tokenizer_name(pre: dict) -> str:
    """llama.cpp's name for the split before BPE: GPT-2's regex, or SmolLM's (digits one by one, then GPT-2's)."""
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return "smollm"
    return "gpt-2"


def _llama_tensors(model):
    """(Hugging Face name, float32 tensor) of each weight to write; q and k back in Meta's rotary layout, and
    the output head left out when it is the embedding (llama.cpp ties it then)."""
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensor = tensor.detach().float().cpu()
        if name.endswith("self_attn.q_proj.weight"):
            tensor = _unpermute(tensor, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = _unpermute(tensor, config.num_key_value_heads)
        yield name, tensor


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(tensor: torch.Tensor, gguf_type: str):
    """The tensor's bytes in `gguf_type` (norms and other 1-D tensors stay float32, as llama.cpp keeps them)."""
    import gguf

    array = tensor.numpy()
    if array.ndim == 1:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if gguf_type == "F16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.BF16 if gguf_type == "BF16" else gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % Q8_BLOCK:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16  # rows not in whole blocks
    return gguf.quants.quantize(array, qtype), qtype
