"""Tiny random transformers Llama models written as HF directories in either config.json form."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from jaxllama.model import Transformer


def tiny_model(seed: int = 0, *, heads: int = 4, kv: int = 2, head_dim: int = 16, hidden: int = 48,
               inter: int = 80, layers: int = 2, vocab: int = 96, max_pos: int = 64,
               tie: bool = False, bias: bool = False, rope: dict | None = None,
               theta: float = 10000.0) -> LlamaForCausalLM:
    """A float32 eval-mode LlamaForCausalLM with weights large enough that mistakes show in logits
    (random norm scales, std 0.1 matrices, random biases)."""
    torch.manual_seed(seed)
    rope_parameters = {"rope_type": "default", "rope_theta": theta, **(rope or {})}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=head_dim, max_position_embeddings=max_pos, tie_word_embeddings=tie,
                      attention_bias=bias, rms_norm_eps=1e-5, rope_parameters=rope_parameters,
                      bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def to_v4_config(path: Path, type_key: str = "rope_type") -> None:
    """Rewrite a saved config.json in the transformers 4.x form: top-level `rope_theta` and
    `rope_scaling` (type under `type_key`: "rope_type", or the old "type")."""
    raw = json.loads((path / "config.json").read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    rope.pop("type", None)
    raw["rope_scaling"] = None if kind == "default" else {type_key: kind, **rope}
    (path / "config.json").write_text(json.dumps(raw, indent=2))


def save_model(model: LlamaForCausalLM, path: Path, form: str = "5.x",
               dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """save_pretrained in `dtype` (the model itself is left in float32); form "5.x", "4.x" or
    "4.x-type" (4.x with the old `type` key)."""
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    out = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    out.save_pretrained(path, **kw)
    if form != "5.x":
        to_v4_config(path, "type" if form == "4.x-type" else "rope_type")
    return path


def hf_logits(path_or_model, ids: np.ndarray) -> np.ndarray:
    """transformers' float32 logits, loading `path` with from_pretrained (weights upcast)."""
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(str(path_or_model), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])
    return np.asarray(fwd(params, jnp.asarray(ids)))


def random_ids(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def tiny_tokenizer(vocab: int = 96):
    """A word-level fast tokenizer over `w4 .. w{vocab-1}`, special tokens, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> "
                         "{% endfor %}")
    return tok
