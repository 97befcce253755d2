"""Zebra-Llama (MLA + Mamba2 hybrid) against the AMD reference code's own outputs.

Everything comes from `FIXTURE` (a copy of shared/fixtures/zebra-tiny, whose README states the
reference's semantics); the file must pass on any fixture set of that format, so nothing here
depends on this set's values beyond what its files and README give.

- The reference format: `read_zebra` reads the hybrid's configs and tensor names, `write_zebra`
  writes them back identically.
- `hybridize` on `teacher/` reproduces the reference's init: the configs; the SVD products of
  layer 0 (`svd_init_layer0.safetensors`) and of every MLA layer of the hybrid (products, not
  factors: SVD signs are not unique) and the rope rows of kv_a exactly; every copied or
  transferred tensor exactly, given the reference's bfloat16 rounding of the teacher; the random
  parts only by shape and by the ranges of the reference's draws.
- Logits, per-layer hidden states, greedy generation with step logits and the prefill caches
  need the `mla` and `mamba2` layer kinds: those tests skip while the kinds are not registered
  and run as soon as they are. The hybrid loads through `load_checkpoint` (format "zebra"), and
  its loaded params exported back (`zebra_model.save_zebra`) equal the reference's file bit for
  bit.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxllama.checkpoint.hf_config import config_from_hf
from jaxllama.checkpoint.zebra import read_zebra, write_zebra
from jaxllama.hybridize import hybridize, plan_from_layout, round_to_bf16

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "zebra-tiny"
PRODUCT_ATOL = 1e-5  # relative to the largest |entry|: float32 SVDs of two LAPACK builds


@pytest.fixture(scope="module")
def reference():
    layout, tensors = read_zebra(FIXTURE / "hybrid")
    return layout, {k: tensors[k] for k in tensors}


@pytest.fixture(scope="module")
def teacher():
    raw = json.loads((FIXTURE / "teacher" / "config.json").read_text())
    return raw, config_from_hf(raw, "teacher/config.json"), load_file(
        str(FIXTURE / "teacher" / "model.safetensors"))


@pytest.fixture(scope="module")
def ours(reference, teacher):
    raw, cfg, tensors = teacher
    return hybridize(tensors, cfg, plan_from_layout(reference[0], seed=7), raw)


def _random_names(layout) -> set[str]:
    """Tensors the reference draws from its RNG (README: do not reproduce them)."""
    names = set()
    for layer in layout.ssm_layers:
        pre = f"model.layers.{layer}.mamba."
        names |= {pre + n for n in ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log")}
    return names


def _in_proj_split(layout):
    """Row slices of Mamba2's in_proj: z, x, B, C, dt (README's order)."""
    e, xb, h = layout.d_inner_, layout.d_xb, layout.nheads
    cuts = np.cumsum([0, e, xb, xb, e, h])
    return dict(zip("zxBCt", (slice(a, b) for a, b in itertools.pairwise(cuts))))


# ----------------------------------------------------------------------------- the format


def test_reference_format_reads_and_writes_back(reference, tmp_path):
    layout, tensors = reference
    hybrid_json = json.loads((FIXTURE / "hybrid" / "hybrid_config.json").read_text())
    assert layout.hybrid_config() == hybrid_json
    assert list(layout.hybrid_config()) == list(hybrid_json)  # the reference's key order
    assert layout.kinds == tuple("mla" if i in hybrid_json["mla_layers"] else "mamba2"
                                 for i in range(hybrid_json["n_layer"]))
    assert set(tensors) == set(layout.tensor_shapes())
    out = write_zebra(tmp_path / "copy", layout, tensors.items())
    layout2, tensors2 = read_zebra(out)
    assert layout2.hybrid_config() == hybrid_json
    assert json.loads((Path(out) / "config.json").read_text()) == json.loads(
        (FIXTURE / "hybrid" / "config.json").read_text())
    for name, a in tensors.items():
        np.testing.assert_array_equal(tensors2[name], a, err_msg=name)


# ----------------------------------------------------------------------------- the init


def test_hybridize_builds_the_reference_configs(reference, ours):
    ref_layout, _ = reference
    layout, tensors = ours
    assert layout.hybrid_config() == ref_layout.hybrid_config()
    ref_llama = json.loads((FIXTURE / "hybrid" / "config.json").read_text())
    got = layout.llama_config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "architectures",
                "rope_theta", "rope_scaling", "max_position_embeddings"):
        assert got.get(key) == ref_llama.get(key), key
    assert list(tensors) == list(ref_layout.tensor_shapes())
    for name, shape in ref_layout.tensor_shapes().items():
        assert tensors[name].shape == shape, name


def _products(t: dict, prefix: str, kv_rank: int):
    q = t[prefix + "q_b_proj.weight"].astype(np.float64) @ t[prefix + "q_a_proj.weight"]
    kv_a = t[prefix + "kv_a_proj_with_mqa.weight"]
    kv = t[prefix + "kv_b_proj.weight"].astype(np.float64) @ kv_a[:kv_rank]
    return q, kv, kv_a[kv_rank:]


def _assert_products(got: dict, got_prefix: str, want: dict, want_prefix: str, kv_rank: int):
    for what, a, b in zip(("q_b @ q_a", "kv_b @ kv_a[:r]", "kv_a rope rows"),
                          _products(got, got_prefix, kv_rank),
                          _products(want, want_prefix, kv_rank)):
        if what == "kv_a rope rows":
            np.testing.assert_array_equal(a, b, err_msg=f"{got_prefix} {what}")
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=PRODUCT_ATOL * np.abs(b).max(),
                                       err_msg=f"{got_prefix} {what}")


def test_svd_init_of_layer0_matches(reference, ours):
    ref_layout, ref = reference
    layout, tensors = ours
    if 0 not in layout.mla_layers:
        pytest.skip("layer 0 of this fixture set is not an MLA layer")
    alone = load_file(str(FIXTURE / "svd_init_layer0.safetensors"))
    _, kv_rank = ref_layout.ranks(0)
    _assert_products(tensors, "model.layers.0.mla.", alone, "", kv_rank)
    # README: the file is bit-identical to the hybrid's layer 0
    for name, a in alone.items():
        np.testing.assert_array_equal(ref[f"model.layers.0.mla.{name}"], a)


def test_svd_init_of_every_mla_layer_matches(reference, ours):
    ref_layout, ref = reference
    _, tensors = ours
    assert ref_layout.mla_layers
    for layer in ref_layout.mla_layers:
        pre = f"model.layers.{layer}.mla."
        _assert_products(tensors, pre, ref, pre, ref_layout.ranks(layer)[1])


def test_copied_and_transferred_tensors_are_exact(reference, ours, teacher):
    ref_layout, ref = reference
    _, tensors = ours
    random = _random_names(ref_layout)
    svd = {f"model.layers.{i}.mla.{n}" for i in ref_layout.mla_layers
           for n in ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
                     "kv_b_proj.weight")}
    checked = 0
    for name, want in ref.items():
        if name in random or name in svd:
            continue
        got = tensors[name]
        if name.endswith("mamba.in_proj.weight"):  # x <- V, B <- K, C <- Q; z, dt random
            rows = _in_proj_split(ref_layout)
            for part in "xBC":
                np.testing.assert_array_equal(got[rows[part]], want[rows[part]],
                                              err_msg=f"{name} {part} rows")
            checked += 1
            continue
        np.testing.assert_array_equal(got, want, err_msg=name)
        checked += 1
    assert checked >= 2 + 6 * ref_layout.n_layer  # embed, final norm; 2 norms, 3 MLP, out_proj
    # the rounding is the reference's: the decoder's tensors are the teacher's bf16 values,
    # lm_head the exact teacher
    _, _, t = teacher
    emb = t["model.embed_tokens.weight"]
    np.testing.assert_array_equal(ref["model.embed_tokens.weight"], round_to_bf16(emb))
    if "lm_head.weight" in ref:
        np.testing.assert_array_equal(ref["lm_head.weight"], t["lm_head.weight"])


def test_unrounded_init_differs_exactly_where_the_teacher_is_not_bf16(reference, teacher):
    ref_layout, ref = reference
    raw, cfg, t = teacher
    _, plain = hybridize(t, cfg, plan_from_layout(ref_layout, round_bf16=False), raw)
    name = "model.layers.0.mlp.down_proj.weight"
    exact_in_bf16 = np.array_equal(round_to_bf16(t[name]), t[name])
    assert np.array_equal(plain[name], t[name])
    assert np.array_equal(plain[name], ref[name]) == exact_in_bf16


def test_random_parts_follow_the_reference_draws(reference, ours):
    """Shapes equal; values in the ranges of the reference's constructors (both files)."""
    ref_layout, ref = reference
    _, tensors = ours
    w = ref_layout.d_conv
    for layer in ref_layout.ssm_layers:
        pre = f"model.layers.{layer}.mamba."
        for src in (ref, tensors):
            dt = np.log1p(np.exp(src[pre + "dt_bias"].astype(np.float64)))  # softplus
            assert np.all(dt >= 1e-4 - 1e-9) and np.all(dt <= 0.1 + 1e-6), pre
            a = np.exp(src[pre + "A_log"].astype(np.float64))
            assert np.all(a >= 1 - 1e-6) and np.all(a <= 16 + 1e-5), pre
            for n in ("conv1d.weight", "conv1d.bias"):
                assert np.abs(src[pre + n]).max() <= 1 / math.sqrt(w) + 1e-6, pre + n
            np.testing.assert_array_equal(src[pre + "D"], np.ones_like(src[pre + "D"]))
            np.testing.assert_array_equal(src[pre + "norm.weight"],
                                          np.ones_like(src[pre + "norm.weight"]))
        for n in ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log"):
            assert tensors[pre + n].shape == ref[pre + n].shape
        rows = _in_proj_split(ref_layout)
        bound = 1 / math.sqrt(ref_layout.hidden_size) + 1e-6
        for part in "zt":
            for src in (ref, tensors):
                assert np.abs(src[pre + "in_proj.weight"][rows[part]]).max() <= bound


# ----------------------------------------------------------------------------- the forward


def _require_hybrid_kinds():
    """Skip (only) while the mla and mamba2 layer kinds are not registered."""
    from jaxllama.mixers import REGISTRY
    missing = [k for k in ("mla", "mamba2") if k not in REGISTRY]
    if missing:
        pytest.skip(f"layer kinds {missing} are not registered yet")


@pytest.fixture(scope="module")
def loaded():
    _require_hybrid_kinds()
    from jaxllama.checkpoint import load_checkpoint
    return load_checkpoint(str(FIXTURE / "hybrid"), "float32")


def test_logits_and_hidden_states(loaded):
    import jax.numpy as jnp

    from jaxllama.model import Transformer
    from jaxllama.training.distill import layer_states
    cfg, params = loaded.config, loaded.params
    ids = jnp.asarray(np.load(FIXTURE / "input_ids.npy"), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, ids, pos)
    np.testing.assert_allclose(np.asarray(logits), np.load(FIXTURE / "logits.npy"), rtol=0,
                               atol=1e-4)
    want = np.load(FIXTURE / "hidden_states.npy")  # [L+1 B T D], the last one final-normed
    states, normed = layer_states(cfg, params, ids, pos, jnp.ones_like(ids))
    got = np.concatenate([np.asarray(states[:-1]), np.asarray(normed)[None]])
    for i in range(want.shape[0]):
        np.testing.assert_allclose(got[i], want[i], rtol=0, atol=1e-4, err_msg=f"hidden {i}")


def _prefill_and_decode(cfg, params, prompt, steps):
    import jax
    import jax.numpy as jnp

    from jaxllama.model import Transformer, init_cache
    model = Transformer(cfg)
    apply = jax.jit(model.apply)  # two compiles (prompt, one token) instead of eager steps
    b, t = prompt.shape
    cache = init_cache(cfg, b, t + steps, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), prompt.shape)
    logits, cache = apply({"params": params}, prompt, pos, cache)
    prefill_cache = cache
    rows, ids = [np.asarray(logits[:, -1])], []
    for step in range(steps - 1):
        nxt = jnp.argmax(jnp.asarray(rows[-1]), axis=-1).astype(jnp.int32)[:, None]
        ids.append(np.asarray(nxt[:, 0]))
        p = jnp.full((b, 1), t + step, jnp.int32)
        logits, cache = apply({"params": params}, nxt, p, cache)
        rows.append(np.asarray(logits[:, -1]))
    ids.append(np.argmax(rows[-1], axis=-1))
    return np.stack(ids, 1), np.stack(rows, 1), prefill_cache


@pytest.fixture(scope="module")
def generated(loaded):
    import jax.numpy as jnp
    prompt = jnp.asarray(np.load(FIXTURE / "gen_prompt_ids.npy"), jnp.int32)
    steps = np.load(FIXTURE / "gen_generated_ids.npy").shape[1]
    return _prefill_and_decode(loaded.config, loaded.params, prompt, steps)


def test_greedy_generation_and_step_logits(generated):
    ids, step_logits, _ = generated
    np.testing.assert_array_equal(ids, np.load(FIXTURE / "gen_generated_ids.npy"))
    np.testing.assert_allclose(step_logits, np.load(FIXTURE / "gen_step_logits.npy"), rtol=0,
                               atol=1e-4)


def _deinterleave(a):
    """[x0, x1, x2, ...] -> [x0, x2, ..., x1, x3, ...] on the last axis (the reference's
    permuted rope layout)."""
    return np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)


def test_prefill_caches(loaded, generated):
    """MLA latent cache [c_kv | rope key] and Mamba2 conv / SSM states after the prompt
    (cache fields as the mla and mamba2 branches name them: latent, rope_k; conv, ssm)."""
    from jaxllama.model import unstack
    cfg = loaded.config
    layout, _ = read_zebra(FIXTURE / "hybrid")
    _, _, cache = generated
    per_layer = unstack(cfg, cache)
    t = np.load(FIXTURE / "gen_prompt_ids.npy").shape[1]
    latent = np.load(FIXTURE / "gen_prefill_mla_latent_cache.npy")  # [n_mla B T r+R]
    r = layout.kv_lora_rank
    for j, layer in enumerate(layout.mla_layers):
        c = per_layer[layer]
        np.testing.assert_allclose(np.asarray(c.latent)[:, :t], latent[j][..., :r], rtol=0,
                                   atol=1e-4, err_msg=f"layer {layer} latent")
        rope = np.asarray(c.rope_k)[:, :t]
        want = latent[j][..., r:]
        # ours may keep the rope key in interleaved pairs: compare in the reference's layout
        if not np.allclose(rope, want, rtol=0, atol=1e-4):
            np.testing.assert_allclose(_deinterleave(rope), want, rtol=0, atol=1e-4,
                                       err_msg=f"layer {layer} rope key")
    conv = np.load(FIXTURE / "gen_prefill_conv_state.npy")  # [n_ssm B C W], oldest first
    ssm = np.load(FIXTURE / "gen_prefill_ssm_state.npy")  # [n_ssm B h P Z]
    for j, layer in enumerate(layout.ssm_layers):
        c = per_layer[layer]
        ours = np.swapaxes(np.asarray(c.conv), -1, -2)  # [B W-1 C] -> [B C W-1]
        w = ours.shape[-1]
        np.testing.assert_allclose(ours, conv[j][..., -w:], rtol=0, atol=1e-4,
                                   err_msg=f"layer {layer} conv state")
        np.testing.assert_allclose(np.asarray(c.ssm), ssm[j], rtol=0, atol=1e-4,
                                   err_msg=f"layer {layer} ssm state")


def test_loaded_params_export_back_bit_identical(loaded, tmp_path):
    """from_pretrained's params written back in the reference format: the same tensor names,
    shapes and float32 values as the reference's own file, and the same configs."""
    from jaxllama.checkpoint import checkpoint_format
    from jaxllama.checkpoint.zebra_model import save_zebra
    layout, _ = read_zebra(FIXTURE / "hybrid")
    out = save_zebra(layout, loaded.config, loaded.params, tmp_path / "out")
    assert checkpoint_format(out) == "zebra"
    ref = load_file(FIXTURE / "hybrid" / "model.safetensors")
    got = load_file(Path(out) / "model.safetensors")
    assert set(got) == set(layout.tensor_shapes()) == set(ref)  # safetensors sorts names
    for name, a in ref.items():
        np.testing.assert_array_equal(got[name], a, err_msg=name)
    again, _ = read_zebra(out)
    assert again == layout
