"""transformers' MambaForCausalLM and Mamba2ForCausalLM (tiny, random, float32; its slow path on
CPU) against the `mamba` and `mamba2` kinds: logits (max abs diff <= 1e-4), greedy tokens of
jaxllama's cached decode (a left-padded batch of two prompts) == transformers' greedy generate of
each prompt, export back to an HF directory that transformers loads with the same logits, and the
convert CLI reading the HF directory. Mamba2 runs with chunk_size 4 over 13 tokens (four chunks)
and n_groups 2. One model per kind, built once per module."""

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from jaxllama import convert
from jaxllama.api import LLM
from jaxllama.checkpoint import load_checkpoint, save_hf
from jaxllama.checkpoint.base import CheckpointError
from jaxllama.model import Transformer

VOCAB, T = 96, 13


def build(kind: str):
    if kind == "mamba":
        cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                          expand=2, conv_kernel=4, time_step_rank=5, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=None, pad_token_id=0)
        model = MambaForCausalLM(cfg)
    else:
        cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_heads=8, head_dim=8, expand=2,
                           state_size=8, n_groups=2, num_hidden_layers=2, conv_kernel=4,
                           chunk_size=4, tie_word_embeddings=False, bos_token_id=1,
                           eos_token_id=None, pad_token_id=0)
        model = Mamba2ForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "A_log" in name:
                p.uniform_(-1.0, 1.5)
            elif "dt_bias" in name or "dt_proj.bias" in name:
                p.uniform_(-3.0, 0.0)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def hf(request, tmp_path_factory):
    """(kind, transformers model, its saved directory, our checkpoint of that directory)."""
    model = build(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path, load_checkpoint(path)


def ids(seed, n, length):
    return np.random.default_rng(seed).integers(2, VOCAB, (n, length))


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def our_logits(ckpt, tokens):
    logits, _ = Transformer(ckpt.config).apply({"params": ckpt.params}, np.asarray(tokens))
    return np.asarray(logits)


def test_config_and_logits_match(hf):
    kind, model, _, ckpt = hf
    cfg = ckpt.config
    assert cfg.layer_pattern == (kind,) * 2 and cfg.intermediate_size == 0
    assert cfg.tie_word_embeddings == (kind == "mamba")
    if kind == "mamba2":
        assert cfg.mamba2.n_groups == 2 and cfg.mamba2.chunk_size == 4 and T > 3 * 4
    tokens = ids(1, 2, T)
    np.testing.assert_allclose(our_logits(ckpt, tokens), torch_logits(model, tokens), atol=1e-4,
                               rtol=0)


def test_greedy_cached_decode_matches_transformers_generate(hf):
    """Two prompts of different lengths in one left-padded batch against transformers' greedy
    generate of each prompt alone."""
    _, model, _, ckpt = hf
    prompts = [ids(2, 1, 9)[0].tolist(), ids(3, 1, 5)[0].tolist()]
    llm = LLM(ckpt.config, ckpt.params, None, ckpt.generation_config, ckpt.source,
              verbose=False)
    ours = llm.generate(prompts, max_new_tokens=8)
    for prompt, done in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert done.token_ids == out[0, len(prompt):].tolist()


def test_export_loads_back_in_transformers(hf, tmp_path):
    kind, model, _, ckpt = hf
    out = save_hf(ckpt.config, ckpt.params, None, tmp_path / "out", ckpt.generation_config)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["model_type"] == kind
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(model)
    tokens = ids(4, 2, T)
    np.testing.assert_allclose(torch_logits(back, tokens), torch_logits(model, tokens), atol=1e-5,
                               rtol=0)


def test_convert_cli_reads_the_hf_directory(hf, tmp_path):
    _, model, path, _ = hf
    out = tmp_path / "orbax"
    assert convert.main(["--input", str(path), "--output", str(out), "--to", "orbax"]) == 0
    back = load_checkpoint(out)
    tokens = ids(5, 1, 6)
    np.testing.assert_allclose(our_logits(back, tokens), torch_logits(model, tokens), atol=1e-4,
                               rtol=0)


def test_layouts_without_an_hf_mamba_form_are_refused(hf, tmp_path):
    _, _, _, ckpt = hf
    cfg = ckpt.config.replace(intermediate_size=16)
    with pytest.raises(CheckpointError, match="export only as an HF Mamba model"):
        save_hf(cfg, ckpt.params, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()
