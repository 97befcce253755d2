"""GGUF files written here with `gguf.GGUFWriter` the way llama.cpp's converter lays them out:
tensor names, Q/K rows permuted per head, a Q8_0-quantized tensor, rope_freqs tables, bad files."""

import gguf
import numpy as np
import pytest
import torch
from parity.tiny_llama import hf_logits, our_logits, random_ids, tiny_model

from jaxllama.checkpoint import CheckpointError, load_checkpoint
from jaxllama.layers.rope import rope_frequencies

Q8 = gguf.GGMLQuantizationType.Q8_0
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, rows (half j, pair i) -> (pair i, half j)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_gguf(path, model, *, arch="llama", quantize=(), rope_freqs=None, skip_keys=()):
    """Write `model` (a transformers Llama) as a float32 GGUF; tensors named in `quantize` are
    stored as Q8_0. Returns {HF name: the float32 weights the file actually holds}."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
        "head_count": c.num_attention_heads, "head_count_kv": c.num_key_value_heads,
        "rope_freq_base": c.rope_parameters["rope_theta"], "layer_norm_rms_eps": c.rms_norm_eps,
        "key_length": c.head_dim, "rope_dimension_count": c.head_dim,
    }
    for key, value in meta.items():
        if key not in skip_keys:
            getattr(w, f"add_{key}")(value)
    stored = {}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in LAYER_NAMES.items()})
    for hf, name in names.items():
        a = model.state_dict()[hf].numpy().astype(np.float32)
        if hf.endswith("q_proj.weight"):
            a_file = llama_cpp_permute(a, c.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            a_file = llama_cpp_permute(a, c.num_key_value_heads)
        else:
            a_file = a
        if hf in quantize:
            q = gguf.quants.quantize(a_file, Q8)
            w.add_tensor(name, q, raw_dtype=Q8)
            a = gguf.quants.dequantize(q, Q8).reshape(a.shape)
            if hf.endswith(("q_proj.weight", "k_proj.weight")):
                raise ValueError("quantize only unpermuted tensors in this helper")
        else:
            w.add_tensor(name, a_file)
        stored[hf] = a
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def test_gguf_layout_matches_transformers(tmp_path):
    model = tiny_model(seed=41, heads=8, kv=2, hidden=64, inter=96, layers=2)
    quantized = ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight"]
    stored = write_gguf(tmp_path / "tiny.gguf", model, quantize=quantized)
    with torch.no_grad():  # transformers runs what the file holds (Q8_0 rounding included)
        for name in quantized:
            model.state_dict()[name].copy_(torch.from_numpy(stored[name]))
    ckpt = load_checkpoint(tmp_path / "tiny.gguf")
    assert ckpt.tokenizer is None  # the file carries no vocabulary
    cfg = ckpt.config
    assert (cfg.attention.num_heads, cfg.attention.num_kv_heads, cfg.num_layers) == (8, 2, 2)
    assert not cfg.tie_word_embeddings and cfg.attention.rope.type == "default"
    ids = random_ids(7, 2, 20, cfg.vocab_size)
    ref = hf_logits(model, ids)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_array_less(np.abs(our_logits(cfg, ckpt.params, ids) - ref).max(), 1e-4)


def llama3_divisors(theta, dim, factor, low, high, orig):
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    scaled = np.where(wavelen < orig / high, inv, np.where(
        wavelen > orig / low, inv / factor, (1 - smooth) * inv / factor + smooth * inv))
    return inv / scaled


def test_rope_freqs_table_is_llama3(tmp_path):
    model = tiny_model(seed=42, head_dim=64, hidden=64, heads=2, kv=1, layers=1, theta=500000.0)
    table = llama3_divisors(500000.0, 64, 8.0, 1.0, 4.0, 8192)
    assert table.min() == pytest.approx(1.0) and table.max() == pytest.approx(8.0)
    write_gguf(tmp_path / "l3.gguf", model, rope_freqs=table)
    rope = load_checkpoint(tmp_path / "l3.gguf").config.attention.rope
    assert (rope.type, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
            rope.original_max_position_embeddings) == ("llama3", pytest.approx(8.0), 1.0, 4.0, 8192)


def test_rope_freqs_table_kept_exactly(tmp_path):
    model = tiny_model(seed=43, layers=1)
    table = np.random.default_rng(0).uniform(1.0, 3.0, 8)
    write_gguf(tmp_path / "t.gguf", model, rope_freqs=table)
    cfg = load_checkpoint(tmp_path / "t.gguf").config
    inv, factor = rope_frequencies(cfg.attention.rope, 16, cfg.max_position_embeddings,
                                   seq_len=10_000)
    want = (1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)) / table
    np.testing.assert_allclose(np.asarray(inv), want, rtol=1e-6)
    assert factor == 1.0


def expect_error(path, *parts):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, msg


def test_bad_gguf_files(tmp_path, smollm2_gguf_path):
    model = tiny_model(seed=44, layers=1)
    write_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2")
    expect_error(tmp_path / "gpt2.gguf", "gpt2.gguf", "architecture 'gpt2' is not supported")
    write_gguf(tmp_path / "nometa.gguf", model, skip_keys=("embedding_length",))
    expect_error(tmp_path / "nometa.gguf", "llama.embedding_length is missing")
    with open(smollm2_gguf_path, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(200_000))  # header cut inside the vocabulary
    expect_error(tmp_path / "cut.gguf", "cut.gguf", "not a readable GGUF file")
