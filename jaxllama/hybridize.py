"""Turn a Llama teacher into a Zebra-Llama hybrid (MLA + Mamba2 layers) at initialisation.

The conversion math of the AMD Zebra-Llama reference (METHODS sections 8, 9 and 11; the exact
semantics are those of `fixtures/zebra-tiny`), from the teacher's HF tensors to the reference
format's tensors (`checkpoint/zebra.py` names them and writes the files):

- MLA layers, SVD init. Queries: `W_q = U S V^T` [N*H, D] -> `q_a = diag(S_r) V_r` [r_q, D],
  `q_b = U_r` [N*H, r_q] with each head's rows regrouped as its first `qk_nope` and last
  `qk_rope` rows. Keys and values: K and V [K*H, D] repeated to the MLA's kv heads, one joint SVD
  of `[K; V]`; `kv_a = [diag(S_r) V_r ; k_avg[-qk_rope:]]` [r_kv + R, D], where the rope rows are
  the mean over the teacher's kv heads of their last `qk_rope` key rows (not from the SVD);
  `kv_b` [K_mla*(nope+U), r_kv] per head = [its first `qk_nope` U_k rows | its U_v rows]. The
  o_proj becomes `out_proj`. SVD signs are not unique, so only products are comparable.
- Mamba2 layers ("kqvo"): `in_proj` rows [z | x | B | C | dt] with x <- V, B <- K, C <- Q
  (d_inner = N*H, x and B at GQA width K*H, one SSM head per attention head, headdim = d_state
  = H), `out_proj` <- O; z and dt rows, the conv, `dt_bias` and `A_log` drawn as the reference's
  constructors draw them (not reproducible draws: the reference's own RNG stream), D = 1,
  the gated norm's weight = 1.
- Mamba1 layers (`ssm="mamba"`, Mamba-in-the-Llama): `in_proj_x` <- V, `B_proj` <- K,
  `C_proj` <- Q, `out_proj` <- O; `in_proj_z`, `dt_proj_down`, `dt_proj`, the conv random; S4D
  real `A_log = log(1..N)`; D = 1.
- MLP and both norms of every layer, the embedding and the final norm copied; `lm_head` copied.

bfloat16 rounding (`round_bf16`): the reference loads the teacher's decoder (`model.model`) in
bfloat16 before the init even when float32 is asked for, so every copied tensor and every SVD
input is the teacher's value rounded to bfloat16 (round-to-nearest-even), and the rope rows are
the bfloat16 mean; `lm_head` (outside the decoder) stays exact. On a bfloat16 teacher (every
published Llama 3.x) the rounding changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxllama.checkpoint.base import CheckpointError
from jaxllama.checkpoint.zebra import ZebraLayout
from jaxllama.config import ModelConfig

SSM_CHOICES = ("mamba2", "mamba")
OUTPUT_FORMATS = ("zebra", "orbax")


@dataclass(frozen=True)
class HybridPlan:
    """Which layers become MLA (the rest SSM) and the MLA ranks; None = the teacher's value
    (`v_head_dim`: the head dim). The YaRN fields are the MLA RoPE's, as the reference's
    training yamls set them (`train_distill.py` always builds a yarn dict)."""

    mla_layers: tuple[int, ...]
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int | None = None
    use_lora_layer_norm: bool = False
    use_full_kv_head: bool = False
    rope_factor: float = 32.0
    original_max_position_embeddings: int = 8192
    ssm: str = "mamba2"
    mamba_d_state: int = 16  # Mamba1 only (Mamba-in-the-Llama's default)
    round_bf16: bool = True
    seed: int = 0


def plan_from_layout(layout: ZebraLayout, **kw) -> HybridPlan:
    """The plan that rebuilds `layout` from its teacher (the YaRN fields from its
    `rope_scaling`); `kw` overrides (`round_bf16`, `seed`, ...)."""
    yarn = layout.rope_scaling or {}
    base = {"mla_layers": layout.mla_layers, "q_lora_rank": layout.q_lora_rank,
            "kv_lora_rank": layout.kv_lora_rank, "qk_nope_head_dim": layout.qk_nope_head_dim,
            "qk_rope_head_dim": layout.qk_rope_head_dim, "v_head_dim": layout.v_head_dim,
            "use_lora_layer_norm": layout.use_lora_layer_norm,
            "use_full_kv_head": layout.use_full_kv_head,
            "rope_factor": float(yarn.get("factor", 32.0)),
            "original_max_position_embeddings": int(
                yarn.get("original_max_position_embeddings", 8192)),
            "ssm": layout.ssm_layer}
    if layout.ssm_layer == "mamba":
        base["mamba_d_state"] = layout.d_state
    return HybridPlan(**{**base, **kw})


def round_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even) and widened back to float32."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def layout_for(cfg: ModelConfig, plan: HybridPlan, llama: dict) -> ZebraLayout:
    """The reference-format description of `cfg`'s hybrid under `plan`, as `train_distill.py`
    builds its `HybridConfig` from the teacher (`llama`: the teacher's config.json dict)."""
    a = cfg.attention
    n, k, h = a.num_heads, a.num_kv_heads, a.head_dim_for(cfg.hidden_size)
    v = plan.v_head_dim or h
    where = "hybridize"
    if plan.ssm not in SSM_CHOICES:
        raise CheckpointError(f"{where}: ssm {plan.ssm!r} is not one of {SSM_CHOICES}")
    bad = [i for i in plan.mla_layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise CheckpointError(f"{where}: MLA layer {bad[0]} is outside 0..{cfg.num_layers - 1}")
    if a.bias:
        raise CheckpointError(f"{where}: a teacher with attention biases is not supported")
    if plan.mla_layers:
        if v != h:
            raise CheckpointError(f"{where}: the SVD init needs v_head_dim == head_dim {h} "
                                  f"(got {v})")
        if plan.qk_nope_head_dim + plan.qk_rope_head_dim > h:
            raise CheckpointError(f"{where}: qk_nope_head_dim + qk_rope_head_dim "
                                  f"{plan.qk_nope_head_dim + plan.qk_rope_head_dim} exceeds the "
                                  f"head dim {h}")
        if plan.qk_rope_head_dim % 2 or plan.qk_rope_head_dim <= 0:
            raise CheckpointError(f"{where}: qk_rope_head_dim must be even and > 0")
        if plan.q_lora_rank is not None and not 0 < plan.q_lora_rank <= min(n * h, cfg.hidden_size):
            raise CheckpointError(f"{where}: q_lora_rank {plan.q_lora_rank} is outside 1.."
                                  f"{min(n * h, cfg.hidden_size)}")
        kv_heads = n if plan.use_full_kv_head else k
        if not 0 < plan.kv_lora_rank <= min(2 * kv_heads * h, cfg.hidden_size):
            raise CheckpointError(f"{where}: kv_lora_rank {plan.kv_lora_rank} is outside 1.."
                                  f"{min(2 * kv_heads * h, cfg.hidden_size)}")
    mamba1 = plan.ssm == "mamba"
    ssm_cfg = ({"d_state": plan.mamba_d_state, "expand": 1, "d_conv": 4,
                "dt_rank": math.ceil(cfg.hidden_size / 16), "repeat_kv_before_conv": True}
               if mamba1 else
               {"expand": 1, "ngroups": n, "d_state": h, "repeat_kv_before_conv": False})
    llama = dict(llama)
    llama["head_dim"] = h
    try:
        return ZebraLayout(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            hidden_act="silu", n_layer=cfg.num_layers, mla_layers=tuple(sorted(plan.mla_layers)),
            rms_norm_eps=cfg.rms_norm_eps, num_attention_heads=n, num_key_value_heads=k,
            kv_lora_rank=plan.kv_lora_rank, q_lora_rank=plan.q_lora_rank,
            use_lora_layer_norm=plan.use_lora_layer_norm, use_full_kv_head=plan.use_full_kv_head,
            qk_rope_head_dim=plan.qk_rope_head_dim, v_head_dim=v,
            qk_nope_head_dim=plan.qk_nope_head_dim, qkv_rank_divisor=8,
            max_position_embeddings=cfg.max_position_embeddings, rope_theta=a.rope.theta,
            rope_scaling={"factor": plan.rope_factor,
                          "original_max_position_embeddings": plan.original_max_position_embeddings,
                          "rope_type": "yarn"},
            attention_bias=False, attention_dropout=0.0, rope_type="yarn",
            d_model=cfg.hidden_size, ssm_cfg=ssm_cfg, d_inner=n * h, d_xb=k * h,
            ssm_layer=plan.ssm, llama=llama)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- MLA (SVD)


def svd_init_q(w_q: np.ndarray, num_heads: int, head_dim: int, rank: int, nope: int, rope: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(q_a [rank, D], q_b [N*(nope+rope), rank]) from W_q [N*H, D] (float32 SVD)."""
    u, s, vh = np.linalg.svd(np.asarray(w_q, np.float32), full_matrices=False)
    q_a = s[:rank, None] * vh[:rank]
    q_b = _per_head_rows(u[:, :rank], num_heads, head_dim, nope, rope)
    return q_a.astype(np.float32), q_b.astype(np.float32)


def _per_head_rows(w: np.ndarray, heads: int, head_dim: int, first: int, last: int) -> np.ndarray:
    """[heads*H, C] -> [heads*(first+last), C]: each head's first `first` and last `last` rows."""
    w = w.reshape(heads, head_dim, -1)
    parts = [w[:, :first]] + ([w[:, head_dim - last:]] if last else [])
    return np.concatenate(parts, axis=1).reshape(heads * (first + last), -1)


def svd_init_kv(w_k: np.ndarray, w_v: np.ndarray, teacher_kv_heads: int, mla_kv_heads: int,
                head_dim: int, rank: int, nope: int, rope: int,
                rope_round: Callable[[np.ndarray], np.ndarray] = lambda a: a
                ) -> tuple[np.ndarray, np.ndarray]:
    """(kv_a [rank+R, D], kv_b [K_mla*(nope+H), rank]) from W_k, W_v [K*H, D].

    K and V are repeated head-wise to `mla_kv_heads`; `[K; V]` gets one SVD; the rope rows of
    kv_a are the mean over the teacher's kv heads of their last `rope` key rows, passed through
    `rope_round` (the reference takes that mean in the teacher's bfloat16)."""
    k3 = np.asarray(w_k, np.float32).reshape(teacher_kv_heads, head_dim, -1)
    v3 = np.asarray(w_v, np.float32).reshape(teacher_kv_heads, head_dim, -1)
    k_avg = rope_round(k3.mean(axis=0))  # [H D]
    rep = mla_kv_heads // teacher_kv_heads
    k_rep = np.repeat(k3, rep, axis=0).reshape(mla_kv_heads * head_dim, -1)
    v_rep = np.repeat(v3, rep, axis=0).reshape(mla_kv_heads * head_dim, -1)
    u, s, vh = np.linalg.svd(np.concatenate([k_rep, v_rep]), full_matrices=False)
    kv_a = np.concatenate([s[:rank, None] * vh[:rank], k_avg[head_dim - rope:]])
    u = u[:, :rank]
    u_k = u[:mla_kv_heads * head_dim].reshape(mla_kv_heads, head_dim, rank)[:, :nope]
    u_v = u[mla_kv_heads * head_dim:].reshape(mla_kv_heads, head_dim, rank)
    kv_b = np.concatenate([u_k, u_v], axis=1).reshape(-1, rank)
    return kv_a.astype(np.float32), kv_b.astype(np.float32)


# ----------------------------------------------------------------------------- random parts


def _linear_default(rng, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """torch's default Linear / Conv1d weight and bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _dt_bias(rng, n: int, dt_min: float = 1e-3, dt_max: float = 0.1,
             floor: float = 1e-4) -> np.ndarray:
    """Inverse softplus of dt drawn log-uniform in [dt_min, dt_max] (floored): softplus(bias)
    starts every channel's step size in that range."""
    dt = np.exp(rng.uniform(size=n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = np.maximum(dt, floor)
    return (dt + np.log(-np.expm1(-dt))).astype(np.float32)


# ----------------------------------------------------------------------------- the layers


def hybrid_tensors(teacher: Mapping[str, np.ndarray], cfg: ModelConfig, plan: HybridPlan,
                   layout: ZebraLayout) -> Iterator[tuple[str, np.ndarray]]:
    """(reference name, float32 array) of every hybrid tensor, in `layout.tensor_shapes()`
    order, one at a time (so a big teacher streams). `teacher` maps HF Llama names to arrays
    (a lazy mapping is fine: each tensor is read once, when needed)."""
    rnd = round_to_bf16 if plan.round_bf16 else (lambda a: np.asarray(a, np.float32))

    def get(name):
        if name not in teacher:
            raise CheckpointError(f"teacher: tensor {name} is missing")
        return rnd(teacher[name])

    yield "model.embed_tokens.weight", get("model.embed_tokens.weight")
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}."
        yield pre + "input_layernorm.weight", get(pre + "input_layernorm.weight")
        att = {p: get(f"{pre}self_attn.{p}_proj.weight") for p in "qkvo"}
        rng = np.random.default_rng([plan.seed, layer])
        mixer = (_mla_layer if layer in layout.mla_layers else
                 _mamba2_layer if plan.ssm == "mamba2" else _mamba1_layer)
        for name, a in mixer(att, layout, layer, rng, rnd if plan.round_bf16 else None):
            yield pre + name, a
        yield pre + "post_attention_layernorm.weight", get(pre + "post_attention_layernorm.weight")
        for p in ("gate", "up", "down"):
            yield f"{pre}mlp.{p}_proj.weight", get(f"{pre}mlp.{p}_proj.weight")
    yield "model.norm.weight", get("model.norm.weight")
    if not layout.tie_word_embeddings:
        if "lm_head.weight" not in teacher:
            raise CheckpointError("teacher: tensor lm_head.weight is missing (and the teacher's "
                                  "embeddings are not tied)")
        yield "lm_head.weight", np.asarray(teacher["lm_head.weight"], np.float32)  # exact


def _mla_layer(att, lay: ZebraLayout, layer: int, rng, rnd):
    n, h = lay.num_attention_heads, lay.head_dim
    nope, rope = lay.qk_nope_head_dim, lay.qk_rope_head_dim
    q_rank, kv_rank = lay.ranks(layer)
    if q_rank is None:
        yield "mla.q_proj.weight", _per_head_rows(att["q"], n, h, nope, rope)
    else:
        q_a, q_b = svd_init_q(att["q"], n, h, q_rank, nope, rope)
        yield "mla.q_a_proj.weight", q_a
        if lay.use_lora_layer_norm:
            yield "mla.q_a_layernorm.weight", np.ones(q_rank, np.float32)
        yield "mla.q_b_proj.weight", q_b
    kv_a, kv_b = svd_init_kv(att["k"], att["v"], lay.num_key_value_heads, lay.mla_kv_heads, h,
                             kv_rank, nope, rope, rnd or (lambda a: a))
    yield "mla.kv_a_proj_with_mqa.weight", kv_a
    if lay.use_lora_layer_norm:
        yield "mla.kv_a_layernorm.weight", np.ones(kv_rank, np.float32)
    yield "mla.kv_b_proj.weight", kv_b
    yield "mla.out_proj.weight", att["o"]


def _mamba2_layer(att, lay: ZebraLayout, layer: int, rng, rnd):
    d, e, h = lay.hidden_size, lay.d_inner_, lay.nheads
    z = _linear_default(rng, (e, d), d)
    dt = _linear_default(rng, (h, d), d)
    # [z | x <- V | B <- K | C <- Q | dt]
    yield "mamba.in_proj.weight", np.concatenate([z, att["v"], att["k"], att["q"], dt])
    w = lay.d_conv
    yield "mamba.conv1d.weight", _linear_default(rng, (lay.conv_dim, 1, w), w)
    yield "mamba.conv1d.bias", _linear_default(rng, (lay.conv_dim,), w)
    yield "mamba.dt_bias", _dt_bias(rng, h)
    yield "mamba.A_log", np.log(rng.uniform(1.0, 16.0, h)).astype(np.float32)
    yield "mamba.D", np.ones(h, np.float32)
    yield "mamba.norm.weight", np.ones(e, np.float32)
    yield "mamba.out_proj.weight", att["o"]


def _mamba1_layer(att, lay: ZebraLayout, layer: int, rng, rnd):
    d, e, r, n, w = lay.hidden_size, lay.d_inner_, lay.dt_rank, lay.d_state, lay.d_conv
    yield "mamba.in_proj_x.weight", att["v"]
    yield "mamba.in_proj_z.weight", _linear_default(rng, (e, d), d)
    yield "mamba.B_proj.weight", att["k"]
    yield "mamba.C_proj.weight", att["q"]
    yield "mamba.dt_proj_down.weight", _linear_default(rng, (r, d), d)
    bound = r ** -0.5  # Mamba's dt_proj init: U(-dt_rank^-1/2, dt_rank^-1/2)
    yield "mamba.dt_proj.weight", rng.uniform(-bound, bound, (e, r)).astype(np.float32)
    yield "mamba.dt_proj.bias", _dt_bias(rng, e)
    yield "mamba.conv1d.weight", _linear_default(rng, (e, 1, w), w)
    yield "mamba.conv1d.bias", _linear_default(rng, (e,), w)
    yield "mamba.A_log", np.log(np.tile(np.arange(1, n + 1, dtype=np.float32), (e, 1)))
    yield "mamba.D", np.ones(e, np.float32)
    yield "mamba.out_proj.weight", att["o"]


def hybridize(teacher: Mapping[str, np.ndarray], cfg: ModelConfig, plan: HybridPlan,
              llama: dict) -> tuple[ZebraLayout, dict[str, np.ndarray]]:
    """(layout, {name: array}) of the whole hybrid in memory (tests, small models); the CLI
    streams `hybrid_tensors` instead."""
    layout = layout_for(cfg, plan, llama)
    return layout, dict(hybrid_tensors(teacher, cfg, plan, layout))


# ----------------------------------------------------------------------------- the CLI
# `python -m jaxllama.convert hybridize ...` (convert.py hands the arguments here); `--to orbax`
# writes the same model as a jaxllama orbax directory (`zebra_model.model_config` and its params)

LAYOUTS = Path(__file__).resolve().parents[1] / "configs" / "zebra" / "layouts.yaml"
_PLAN_KEYS = ("mla_layers", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "rope_factor", "original_max_position_embeddings")


def read_preset(name: str, path: Path = LAYOUTS) -> dict:
    """A named Zebra-Llama layout of `configs/zebra/layouts.yaml` (or of the YAML file `name`)."""
    from jaxllama.config import load_yaml
    if name.endswith((".yaml", ".yml")):
        path, name = Path(name), None
    data = load_yaml(path)
    if name is None:
        if len(data) != 1:
            raise CheckpointError(f"{path}: a preset file holds one layout, found {len(data)}")
        name = next(iter(data))
    if name not in data:
        raise CheckpointError(f"--preset: {name!r} is not in {path} (known: "
                              f"{', '.join(sorted(data))})")
    entry = data[name]
    unknown = sorted(set(entry) - set(_PLAN_KEYS) - {"base", "teacher"})
    if unknown:
        raise CheckpointError(f"{path}: {name}.{unknown[0]}: unknown key")
    return {k: entry[k] for k in _PLAN_KEYS if k in entry}


def _layers_arg(text: str) -> tuple[int, ...]:
    import argparse
    try:
        layers = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}")
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"layer listed twice in {text!r}")
    return layers


def _rank_arg(text: str) -> int | None:
    import argparse
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or none, got {text!r}")
    return int(text)


def parse_args(argv=None):
    from jaxllama.cli import CliParser
    p = CliParser(prog="python -m jaxllama.convert hybridize",
                  description="Turn an HF Llama into a Zebra-Llama MLA + SSM hybrid (reference "
                              "format: config.json + hybrid_config.json + safetensors).")
    p.add_argument("--input", default=None, help="the teacher: HF Llama directory or Hub id (a "
                   ".gguf or orbax directory also works; default: the embedded SmolLM2)")
    p.add_argument("--output", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--to", choices=OUTPUT_FORMATS, default=OUTPUT_FORMATS[0],
                   help="zebra: the reference format (config.json + hybrid_config.json + "
                        "safetensors; default); orbax: a jaxllama orbax directory (model.yaml + "
                        "params/), what training recipes chain through (Mamba2 hybrids only)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--mla-layers", type=_layers_arg, metavar="0,4,8",
                       help="layers that become MLA; every other layer becomes the SSM")
    which.add_argument("--preset", help="a Zebra-Llama layout of configs/zebra/layouts.yaml "
                       "(e.g. zebra-llama-1b-8mla-8m2) or a YAML file holding one; the flags "
                       "below override its values")
    p.add_argument("--q-lora-rank", type=_rank_arg, help="MLA query rank (none: plain q_proj)")
    p.add_argument("--kv-lora-rank", type=int, help="MLA latent rank r_kv")
    p.add_argument("--qk-nope-head-dim", type=int, help="default: head_dim / 2")
    p.add_argument("--qk-rope-head-dim", type=int, help="default: head_dim / 2")
    p.add_argument("--v-head-dim", type=int, help="default (and the only SVD-initialisable "
                   "value): head_dim")
    p.add_argument("--rope-factor", type=float, help="MLA YaRN factor (default 32)")
    p.add_argument("--original-max-position-embeddings", type=int, help="MLA YaRN original "
                   "context (default 8192)")
    p.add_argument("--lora-layer-norm", action="store_true",
                   help="RMSNorm on the q and kv latents (the reference's use_lora_layer_norm)")
    p.add_argument("--full-kv-head", action="store_true",
                   help="kv_b at full head count instead of GQA width (use_full_kv_head)")
    p.add_argument("--ssm", choices=SSM_CHOICES, default=SSM_CHOICES[0],
                   help="the non-MLA layers: mamba2 (Zebra-Llama) or mamba (Mamba-in-the-Llama's "
                        "Mamba1 variant, MambaInLlama tensor names; not read by the Zebra code)")
    p.add_argument("--mamba-d-state", type=int, default=16, help="--ssm mamba: state size N")
    p.add_argument("--bf16-round", choices=("on", "off"), default="on",
                   help="round the teacher to bfloat16 before the init, as the reference does "
                        "(default on: it changes values only for a float32 or float16 teacher, "
                        "where parity with the reference needs it; a bfloat16 teacher, like every "
                        "published Llama 3.x, is unchanged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomly drawn SSM tensors")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype written (the reference saves the dtype it ran in)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    if args.preset is None and args.mla_layers and args.kv_lora_rank is None:
        p.error("--kv-lora-rank is required with --mla-layers (or use --preset)")
    if args.preset is None and args.mla_layers and "q_lora_rank" not in _given(argv):
        p.error("--q-lora-rank is required with --mla-layers (a number, or none)")
    return args


def _given(argv) -> set[str]:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    return {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}


def plan_from_args(args, cfg: ModelConfig, argv=None) -> HybridPlan:
    """Preset values, then the flags given, then the defaults (nope = rope = head_dim / 2)."""
    h = cfg.attention.head_dim_for(cfg.hidden_size)
    kw: dict = read_preset(args.preset) if args.preset else {"mla_layers": args.mla_layers}
    given = _given(argv)
    for key in _PLAN_KEYS[1:]:
        if key in given or key not in kw:
            value = getattr(args, key)
            if value is not None or key == "q_lora_rank":
                kw[key] = value
    kw.setdefault("qk_nope_head_dim", h // 2)
    kw.setdefault("qk_rope_head_dim", h // 2)
    kw["mla_layers"] = tuple(kw["mla_layers"])
    if kw["mla_layers"] and kw.get("kv_lora_rank") is None:
        raise CheckpointError("--kv-lora-rank is required")
    kw.setdefault("kv_lora_rank", 0)
    return HybridPlan(**kw, use_lora_layer_norm=args.lora_layer_norm,
                      use_full_kv_head=args.full_kv_head, ssm=args.ssm,
                      mamba_d_state=args.mamba_d_state, round_bf16=args.bf16_round == "on",
                      seed=args.seed)


class _LazyHF(Mapping):
    """{HF name: array} read one tensor at a time from an HF directory's safetensors."""

    def __init__(self, path: Path):
        from jaxllama.checkpoint.zebra import ZebraTensors
        self._t = ZebraTensors(path)

    def __getitem__(self, name):
        return self._t[name]

    def __iter__(self):
        return iter(self._t)

    def __len__(self):
        return len(self._t)


def load_teacher(path: str | None):
    """(ModelConfig, {HF name: array} mapping, config.json dict, generation_config.json dict,
    tokenizer) of any checkpoint `load_checkpoint` reads; an HF directory streams."""
    import json

    from jaxllama.checkpoint import checkpoint_format, default_checkpoint, resolve_checkpoint
    from jaxllama.checkpoint.hf_config import config_from_hf, config_to_hf, generation_to_hf
    path = resolve_checkpoint(path) if path else default_checkpoint()
    if checkpoint_format(path) == "hf":
        from jaxllama.checkpoint.hf import load_tokenizer, read_json
        p = Path(path)
        raw = read_json(p / "config.json")
        cfg = config_from_hf(raw, str(p / "config.json"))
        gen_file = p / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cfg, _LazyHF(p), raw, gen, load_tokenizer(p)
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.checkpoint.base import export_tensors
    ck = load_checkpoint(path, "float32")
    tensors = dict(export_tensors(ck.config, ck.params))
    raw = config_to_hf(ck.config, ck.generation_config, "float32")
    return ck.config, tensors, raw, generation_to_hf(ck.generation_config), ck.tokenizer


def _check_output(out: str, overwrite: bool) -> None:
    """Refuse an unusable output directory before any work (the writers check again, atomic)."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or (any(p.iterdir()) and not overwrite)):
        raise CheckpointError(f"{p}: output exists and is not an empty directory "
                              "(use --overwrite)")


def _orbax_params(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]]) -> dict:
    """The params tree of `cfg` (a `zebra_model.model_config`) from the hybrid's reference-named
    tensors; each host array is dropped once it is copied into its stacked buffer."""
    from jaxllama.checkpoint.base import TensorSource, assemble_params
    from jaxllama.checkpoint.zebra_model import zebra_tensor_specs
    held = dict(tensors)
    src = TensorSource({n: "the hybrid" for n in held}, lambda n: held[n].shape, held.pop,
                       "the hybrid")
    return assemble_params(cfg, src, cfg.param_dtype, desc="assembling",
                           specs=zebra_tensor_specs(cfg))


def run(args, argv=None) -> str:
    """Hybridize `args.input` into `args.output` in the `args.to` format; returns the path."""
    from tqdm.auto import tqdm

    from jaxllama.checkpoint.zebra import write_zebra
    to = getattr(args, "to", OUTPUT_FORMATS[0])
    _check_output(args.output, args.overwrite)
    if to == "orbax" and args.ssm != "mamba2":
        raise CheckpointError(f"--to orbax: --ssm {args.ssm} hybrids have no jaxllama layer kind "
                              "(only Mamba2 hybrids load as models); write the reference format")
    cfg, teacher, raw, gen, tokenizer = load_teacher(args.input)
    if any(k != cfg.layer_pattern[0] for k in cfg.layer_pattern):
        raise CheckpointError("--input: the teacher must be a plain Llama (one layer kind)")
    plan = plan_from_args(args, cfg, argv)
    layout = layout_for(cfg, plan, raw)
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    tensors = ((n, a.astype(dtype)) for n, a in hybrid_tensors(teacher, cfg, plan, layout))
    bar = tqdm(tensors, total=len(layout.tensor_shapes()), desc="hybridizing", unit="tensor",
               disable=None)
    raw = dict(layout.llama, torch_dtype=args.dtype)
    layout = dataclasses.replace(layout, llama=raw)
    if to == "zebra":
        return write_zebra(args.output, layout, bar, gen, tokenizer, overwrite=args.overwrite)
    from jaxllama.checkpoint import save_orbax
    from jaxllama.checkpoint.base import with_dtype
    from jaxllama.checkpoint.hf_config import generation_from_hf
    from jaxllama.checkpoint.zebra_model import model_config
    hybrid = with_dtype(model_config(layout), args.dtype)
    params = _orbax_params(hybrid, bar)
    return save_orbax(hybrid, params, tokenizer, args.output,
                      generation_from_hf(gen, raw, tokenizer), overwrite=args.overwrite)


def main(argv=None) -> int:
    import sys
    import time

    from jaxllama.config import ConfigError
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        out = run(args, argv)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"wrote the hybrid ({args.ssm}, {args.to} format) to {out} in "
          f"{time.perf_counter() - start:.1f}s")
    return 0


__all__ = ["LAYOUTS", "OUTPUT_FORMATS", "SSM_CHOICES", "HybridPlan", "hybrid_tensors", "hybridize",
           "layout_for", "main", "plan_from_layout", "read_preset", "round_to_bf16", "svd_init_kv",
           "svd_init_q"]
