"""Initialise training from an HF checkpoint and export the trained model back to HF format."""

import json

import jax
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from jaxllama.checkpoint import load_checkpoint, save_hf
from jaxllama.config import AttentionConfig, ModelConfig
from jaxllama.model import Transformer, init_params
from jaxllama.training.config import train_config_from_dict
from jaxllama.training.data import DataLoader, byte_tokenizer
from jaxllama.training.trainer import run

CFG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, layer_pattern=("dense",) * 2,
                  max_position_embeddings=128,
                  attention=AttentionConfig(num_heads=4, num_kv_heads=2))


def test_init_from_hf_train_and_export(tmp_path):
    tok = byte_tokenizer()
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(7))
    save_hf(CFG, jax.device_get(params), tok, tmp_path / "hf_in",
            {"eos_token_ids": [tok.eos_token_id]})
    # one long document: every window is one segment at positions 0..T-1, as in transformers
    rng = np.random.default_rng(0)
    (tmp_path / "c.txt").write_text(" ".join(rng.choice(["tide", "salt", "oar", "gull"], 600)))
    cfg = train_config_from_dict({
        "init": {"checkpoint": str(tmp_path / "hf_in")},
        "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "data": {"paths": [str(tmp_path / "c.txt")], "tokenizer": "checkpoint"},
        "train": {"steps": 2, "seq_len": 32, "batch_size": 4, "lr": 1e-2, "compute_dtype":
                  "float32", "loss_chunk": 8},
        "checkpoint": {"export_hf": str(tmp_path / "hf_out"),
                       "export_orbax": str(tmp_path / "orbax_out")},
        "log": {"dir": str(tmp_path / "log"), "progress": False, "tensorboard": False},
    })
    out = run(cfg)
    assert out["step"] == 2 and out["stopped"] is None

    # step 1 trained the HF weights: its loss is transformers' loss on the first batch
    first = next(DataLoader(cfg.data, tok, 32, 4, eos=tok.eos_token_id))
    hf_in = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_in", torch_dtype=torch.float32)
    with torch.no_grad():
        logits = hf_in(torch.tensor(first["inputs"], dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 264),
                                            torch.tensor(first["targets"]).reshape(-1).long(),
                                            reduction="none").numpy()
    w = first["weights"].reshape(-1)
    np.testing.assert_allclose(out["losses"][1], (nll * w).sum() / w.sum(), rtol=1e-5)

    # the export is the trained model: transformers on hf_out == our model on the orbax export
    trained = load_checkpoint(str(tmp_path / "orbax_out"))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         trained.params, jax.device_get(params))
    assert min(jax.tree.leaves(moved)) > 0
    hf_out = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out", torch_dtype=torch.float32)
    ids = rng.integers(0, 260, (2, 20))
    with torch.no_grad():
        ref = hf_out(torch.tensor(ids)).logits.numpy()
    ours, _ = Transformer(trained.config).apply({"params": trained.params}, ids)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
    assert json.loads((tmp_path / "hf_out" / "config.json").read_text())["num_hidden_layers"] == 2
