"""Chunked loss, schedules, config validation, checkpoint fallback, FLOP accounting."""

import logging

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.config import AttentionConfig, ConfigError, ModelConfig
from jaxllama.model import Transformer, init_params
from jaxllama.training.checkpointing import CheckpointManager
from jaxllama.training.config import check_against_devices, load_train_config
from jaxllama.training.loss import chunked_cross_entropy
from jaxllama.training.metrics import flops_per_token, matmul_params
from jaxllama.training.optimizer import lr_schedule

CFG = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, layer_pattern=("dense",),
                  attention=AttentionConfig(num_heads=2, num_kv_heads=1))


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_logits(tied):
    cfg = CFG.replace(tie_word_embeddings=tied)
    model = Transformer(cfg)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))
    ks = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(ks[0], (2, 12, 16))
    y = jax.random.randint(ks[1], (2, 12), 0, 50)
    w = (jax.random.uniform(ks[2], (2, 12)) > 0.3).astype(jnp.float32)

    def full(p, h):
        logits = model.apply({"params": p}, h, method=Transformer.logits)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
        return jnp.sum(nll * w)

    def chunked(p, h):
        return chunked_cross_entropy(model, p, h, y, w, chunk=4)[0]

    np.testing.assert_allclose(jax.jit(chunked)(params, h), jax.jit(full)(params, h), rtol=1e-6)
    g_full = jax.jit(jax.grad(full, argnums=(0, 1)))(params, h)
    g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(params, h)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the chunked loss and its gradient never build [B T V] logits: nothing in the jaxpr (scan
    # bodies included) is as large as 2 x 12 x 50; the full version does build them
    def largest(fn):
        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                yield from (v.aval.size for v in eqn.outvars if hasattr(v.aval, "size"))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    yield from walk(sub)
        return max(walk(jax.make_jaxpr(jax.grad(fn))(params, h).jaxpr))

    assert largest(full) >= 2 * 12 * 50
    assert largest(chunked) < 2 * 12 * 50


def test_schedule_warmup_then_decay():
    s = lr_schedule(1e-3, 100, 10, "cosine", 0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(100)) == pytest.approx(1e-4)
    lin = lr_schedule(1e-3, 20, 0, "linear", 0.0)
    assert float(lin(10)) == pytest.approx(5e-4)


def test_config_validation_names_file_and_key(tmp_path):
    cfg = load_train_config("configs/train/tiny.yaml")
    assert cfg.train.steps == 30 and cfg.mesh.seq == 4
    assert check_against_devices(cfg, 8, 1, "ring") == {"data": 2, "fsdp": 1, "tensor": 1,
                                                       "seq": 4}
    with pytest.raises(ConfigError, match="tiny.yaml: train.batch_size: 4 is not divisible by "
                                          "grad_accum x mesh.data x mesh.fsdp = 8"):
        check_against_devices(load_train_config("configs/train/tiny.yaml", ["mesh.data=8",
                                                                            "mesh.seq=1"]), 8)
    with pytest.raises(ConfigError, match=r"train.seq_len: 36 is not divisible by 8 \(2 x mesh"):
        check_against_devices(load_train_config("configs/train/tiny.yaml",
                                                ["train.seq_len=36", "train.loss_chunk=0"]),
                              8, 1, "ring")
    with pytest.raises(ConfigError, match="tiny.yaml: model.kernels.context_parallel: 'rin'"):
        load_train_config("configs/train/tiny.yaml", ["model.kernels.context_parallel=rin"])
    with pytest.raises(ConfigError, match="tiny.yaml: train.schedule: 'cos' is not one of"):
        load_train_config("configs/train/tiny.yaml", ["train.schedule=cos"])
    bad = tmp_path / "t.yaml"
    bad.write_text("train: {steps: 3}\ndata: {paths: [x.txt]}\nlogs: {}\n")
    with pytest.raises(ConfigError, match=f"{bad}: logs: unknown key"):
        load_train_config(bad)


def test_checkpoint_falls_back_from_damaged_latest(tmp_path, caplog):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    mngr = CheckpointManager(tmp_path / "ck", every=1, keep=3, async_save=True)
    for step in (1, 2):
        state = {"w": state["w"] + 1, "step": jnp.int32(step)}
        assert mngr.save(step, state, {"next_index": step * 4}, {"loss": 1.0 / step})
    mngr.close()
    # damage the newest step: empty every file of its state item
    for f in (tmp_path / "ck" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    # and leave an unfinished save behind, as a kill during an async write would
    (tmp_path / "ck" / "3.orbax-checkpoint-tmp-123").mkdir()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    mngr = CheckpointManager(tmp_path / "ck", every=1, keep=3)
    with caplog.at_level(logging.WARNING):
        step, restored, data, meta = mngr.restore_latest(abstract)
    mngr.close()
    assert step == 1 and data == {"next_index": 4} and meta == {"loss": 1.0}
    np.testing.assert_array_equal(restored["w"], jnp.arange(6.0).reshape(2, 3) + 1)
    assert any("unreadable" in r.message and "/2 " in r.message for r in caplog.records)


def test_flops_per_token_counts_matmuls_and_attention():
    # 1 layer: q 16*2*8, k/v 2*16*1*8, o 2*8*16, mlp 3*16*32, head 16*50
    assert matmul_params(CFG) == 256 + 256 + 256 + 1536 + 800
    assert flops_per_token(CFG, 64) == 6 * 3104 + 6 * 64 * 2 * 8


def test_plot_metrics_writes_png(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "plot_metrics", Path(__file__).resolve().parents[2] / "scripts" / "plot_metrics.py")
    plot_metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_metrics)
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in (1, 2, 3)]
    rows.append({"step": 3, "loss": 4.0, "lr": 1e-3})  # a resumed run re-logs step 3
    log.write_text("\n".join(json.dumps(r) for r in rows))
    assert plot_metrics.read_log(log)[3]["loss"] == 4.0
    out = tmp_path / "loss.png"
    assert plot_metrics.main([str(log), "--out", str(out), "--smooth", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics.main([str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def test_bf16_mixed_precision_with_remat():
    """bf16 compute (with full remat) keeps float32 master weights and gradients, close to the
    float32 ones."""
    from jaxllama.config import KernelConfig
    from jaxllama.training.step import loss_and_grads
    from tests.test_sharding import random_batch

    batch = random_batch(np.random.default_rng(5), 2, 16, vocab=50)
    params = jax.jit(init_params, static_argnums=0)(CFG.replace(layer_pattern=("dense",) * 2),
                                                   jax.random.key(3))

    def grads(dtype, remat):
        cfg = CFG.replace(layer_pattern=("dense",) * 2, dtype=dtype,
                          kernels=KernelConfig(remat=remat))
        model = Transformer(cfg)
        return jax.jit(lambda p, b: loss_and_grads(p, model, b))(params, batch)

    l32, _, g32 = grads("float32", "none")
    l16, _, g16 = grads("bfloat16", "full")
    assert abs(float(l16) - float(l32)) < 2e-2 * float(l32)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.float32
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b) + 1e-6
