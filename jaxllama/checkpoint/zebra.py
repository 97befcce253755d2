"""The Zebra-Llama reference format (AMD-Hybrid-Models): files, configs and tensor names.

A Zebra-Llama checkpoint directory (the AMD reference code's `save_pretrained` + `save_config`,
and the published amd/Zebra-Llama-* checkpoints) holds:

- `config.json`: the teacher's Llama config (`LlamaConfig`; `architectures` names
  `CustomLlamaForCausalLM`, plus `head_dim`); its RoPE fields feed no hybrid layer;
- `hybrid_config.json`: the layer plan and the mixers' dims (`dataclasses.asdict(HybridConfig)`):
  the layers of `mla_layers` are MLA, every other layer Mamba2;
- `model.safetensors` (or shards + index): the hybrid's state dict, reference key names
  (`model.layers.{l}.mla.q_a_proj.weight`, `model.layers.{l}.mamba.in_proj.weight`, ...).

This module works at the level of files, configs and tensor names only: `ZebraLayout` is the
plain description of such a checkpoint (what the MLA and Mamba2 mixers are built from, and the
name and shape of every tensor), `read_zebra` / `write_zebra` read and write the directory. It
builds no `ModelConfig`: `checkpoint/zebra_model.py` maps the description onto the `mla` /
`mamba2` layer kinds (config, tensor names, load, export). `ssm_layer: mamba` (our extension, not read by the reference loaders) marks the
Mamba-in-the-Llama Mamba1 variant written by `hybridize --ssm mamba`, with MambaInLlama's names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from jaxllama.checkpoint.base import CheckpointError, atomic_output_dir

HYBRID_CONFIG = "hybrid_config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SSM_LAYERS = ("mamba2", "mamba")
DEFAULT_SHARD_BYTES = 5 * 1024**3
# HybridConfig fields later reference commits added (per-layer and energy-based ranks): read when
# present, written only when not at their defaults, so the file matches the fixture's commit.
_LATER_FIELDS = {"use_fixed_rank_for_first_and_last_block": False, "layer_rank_list": {},
                 "q_energy_ratio": None, "kv_energy_ratio": None}


@dataclass(frozen=True)
class ZebraLayout:
    """Everything `hybrid_config.json` says, with the reference `HybridConfig`'s defaults, plus
    the Llama fields of `config.json` an importer needs (`llama`: that file as a dict).

    Field names and order are the reference's (so `hybrid_config()` writes its `asdict` form);
    `ssm_cfg` holds the Mamba2 knobs (`ngroups` = heads, `d_state` = headdim, `expand`,
    `repeat_kv_before_conv`; for `ssm_layer: mamba`: `d_state`, `dt_rank`, `d_conv`).
    `layer_rank_list` ({"l": {"q_rank", "kv_rank"}}) overrides the MLA ranks per layer.
    """

    hidden_size: int = 4096
    intermediate_size: int = 18432
    hidden_act: str = "silu"
    n_layer: int = 32
    mla_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-5
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    kv_lora_rank: int = 128
    q_lora_rank: int | None = 1536
    use_lora_layer_norm: bool = False
    use_fixed_rank_for_first_and_last_block: bool = False
    use_full_kv_head: bool = False
    layer_rank_list: dict = field(default_factory=dict)
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    q_energy_ratio: float | None = None
    kv_energy_ratio: float | None = None
    qkv_rank_divisor: int = 8
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    rope_type: str = "yarn"
    d_model: int = 2560
    ssm_cfg: dict = field(default_factory=dict)
    d_inner: int | None = None
    d_xb: int = 2560
    ssm_layer: str = "mamba2"  # ours; absent from the reference's files
    llama: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "mla_layers", tuple(int(i) for i in self.mla_layers))
        for i in self.mla_layers:
            _need(0 <= i < self.n_layer, "mla_layers", f"layer {i} is outside 0..{self.n_layer - 1}")
        _need(self.ssm_layer in SSM_LAYERS, "ssm_layer", f"{self.ssm_layer!r} is not one of "
              f"{SSM_LAYERS}")
        _need(self.hidden_act == "silu", "hidden_act", f"{self.hidden_act!r} (silu only)")
        _need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
              f"{self.num_key_value_heads} does not divide num_attention_heads "
              f"{self.num_attention_heads}")
        if self.ssm_layers:
            _need(self.d_model == self.hidden_size, "d_model",
                  f"{self.d_model} differs from hidden_size {self.hidden_size}")
            _need(self.d_inner_ % self.d_state == 0 and self.d_xb % self.d_state == 0, "ssm_cfg",
                  f"d_state {self.d_state} must divide d_inner {self.d_inner_} and d_xb "
                  f"{self.d_xb}")
            if self.ssm_layer == "mamba2":
                _need(self.nheads * self.d_state == self.d_inner_, "ssm_cfg.ngroups",
                      f"ngroups {self.nheads} x d_state {self.d_state} != d_inner {self.d_inner_}")

    # ------------------------------------------------------------------ what each layer is

    @property
    def kinds(self) -> tuple[str, ...]:
        """Per layer: "mla", or `ssm_layer` ("mamba2" / "mamba")."""
        return tuple("mla" if i in self.mla_layers else self.ssm_layer
                     for i in range(self.n_layer))

    @property
    def ssm_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if i not in self.mla_layers)

    def ranks(self, layer: int) -> tuple[int | None, int]:
        """(q_lora_rank, kv_lora_rank) of an MLA layer (`layer_rank_list` wins)."""
        r = self.layer_rank_list.get(str(layer))
        if r:
            return r.get("q_rank", self.q_lora_rank), r.get("kv_rank", self.kv_lora_rank)
        return self.q_lora_rank, self.kv_lora_rank

    @property
    def head_dim(self) -> int:
        """The teacher's head dim H (config.json `head_dim`, else hidden / heads)."""
        return int(self.llama.get("head_dim") or self.hidden_size // self.num_attention_heads)

    @property
    def mla_kv_heads(self) -> int:
        """Heads of `kv_b_proj` (GQA width unless `use_full_kv_head`)."""
        return self.num_attention_heads if self.use_full_kv_head else self.num_key_value_heads

    # ------------------------------------------------------------------ SSM dims

    @property
    def d_inner_(self) -> int:
        return self.d_inner if self.d_inner is not None else self.hidden_size

    @property
    def d_state(self) -> int:
        return int(self.ssm_cfg.get("d_state", 128 if self.ssm_layer == "mamba2" else 16))

    @property
    def nheads(self) -> int:
        """Mamba2 heads (= `ngroups`; headdim = d_state)."""
        return int(self.ssm_cfg.get("ngroups", 1))

    @property
    def d_conv(self) -> int:
        return int(self.ssm_cfg.get("d_conv", 4))

    @property
    def repeat_kv_before_conv(self) -> bool:
        return bool(self.ssm_cfg.get("repeat_kv_before_conv", self.ssm_layer == "mamba"))

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: Mamba2 [x | B | C] (3 x d_inner when x, B are
        repeated before it); Mamba1 the d_inner channels of x."""
        if self.ssm_layer == "mamba" or self.repeat_kv_before_conv:
            return self.d_inner_ * (3 if self.ssm_layer == "mamba2" else 1)
        return self.d_inner_ + 2 * self.d_xb

    @property
    def dt_rank(self) -> int:
        return int(self.ssm_cfg.get("dt_rank") or math.ceil(self.hidden_size / 16))

    # ------------------------------------------------------------------ tensors

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        """{name: shape} of one layer's tensors, names relative to `model.layers.{l}.`."""
        d, f = self.hidden_size, self.intermediate_size
        out = {"input_layernorm.weight": (d,)}
        if layer in self.mla_layers:
            out.update(self._mla_tensors(layer))
        elif self.ssm_layer == "mamba2":
            e, xb, h, w = self.d_inner_, self.d_xb, self.nheads, self.d_conv
            out.update({"mamba.in_proj.weight": (2 * e + 2 * xb + h, d),
                        "mamba.conv1d.weight": (self.conv_dim, 1, w),
                        "mamba.conv1d.bias": (self.conv_dim,),
                        "mamba.dt_bias": (h,), "mamba.A_log": (h,), "mamba.D": (h,),
                        "mamba.norm.weight": (e,), "mamba.out_proj.weight": (d, e)})
        else:
            e, xb, r, n, w = self.d_inner_, self.d_xb, self.dt_rank, self.d_state, self.d_conv
            out.update({"mamba.in_proj_x.weight": (xb, d), "mamba.in_proj_z.weight": (e, d),
                        "mamba.B_proj.weight": (xb, d), "mamba.C_proj.weight": (e, d),
                        "mamba.dt_proj_down.weight": (r, d), "mamba.dt_proj.weight": (e, r),
                        "mamba.dt_proj.bias": (e,), "mamba.conv1d.weight": (e, 1, w),
                        "mamba.conv1d.bias": (e,), "mamba.A_log": (e, n), "mamba.D": (e,),
                        "mamba.out_proj.weight": (d, e)})
        out.update({"post_attention_layernorm.weight": (d,), "mlp.gate_proj.weight": (f, d),
                    "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)})
        return out

    def _mla_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        d, n = self.hidden_size, self.num_attention_heads
        qk, rope, v = self.qk_nope_head_dim + self.qk_rope_head_dim, self.qk_rope_head_dim, \
            self.v_head_dim
        q_rank, kv_rank = self.ranks(layer)
        out = {}
        if q_rank is None:
            out["mla.q_proj.weight"] = (n * qk, d)
        else:
            out["mla.q_a_proj.weight"] = (q_rank, d)
            if self.use_lora_layer_norm:
                out["mla.q_a_layernorm.weight"] = (q_rank,)
            out["mla.q_b_proj.weight"] = (n * qk, q_rank)
        out["mla.kv_a_proj_with_mqa.weight"] = (kv_rank + rope, d)
        if self.use_lora_layer_norm:
            out["mla.kv_a_layernorm.weight"] = (kv_rank,)
        out["mla.kv_b_proj.weight"] = (self.mla_kv_heads * (self.qk_nope_head_dim + v), kv_rank)
        out["mla.out_proj.weight"] = (d, n * v)
        if self.attention_bias:  # the reference's Linear biases (q_a / q_proj, kv_a, out_proj)
            first = "mla.q_proj" if q_rank is None else "mla.q_a_proj"
            out[f"{first}.bias"] = (n * qk if q_rank is None else q_rank,)
            out["mla.kv_a_proj_with_mqa.bias"] = (kv_rank + rope,)
            out["mla.out_proj.bias"] = (d,)
        return out

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.llama.get("tie_word_embeddings", False))

    @property
    def vocab_size(self) -> int:
        return int(self.llama["vocab_size"])

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """{full name: shape} of every tensor of the checkpoint, in state-dict order."""
        out = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size)}
        for layer in range(self.n_layer):
            out.update({f"model.layers.{layer}.{k}": s
                        for k, s in self.layer_tensors(layer).items()})
        out["model.norm.weight"] = (self.hidden_size,)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return out

    # ------------------------------------------------------------------ files

    def hybrid_config(self) -> dict:
        """`hybrid_config.json` contents (the reference's `asdict(HybridConfig)` key order; the
        `ssm_layer` key only for our Mamba1 variant, later fields only when set)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "llama" or (f.name == "ssm_layer" and self.ssm_layer == "mamba2"):
                continue
            if f.name in _LATER_FIELDS and value == _LATER_FIELDS[f.name]:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_files(cls, hybrid: dict, llama: dict, where: str = HYBRID_CONFIG) -> ZebraLayout:
        """From parsed `hybrid_config.json` and `config.json`; unknown or mistyped keys are one
        line naming the key (the reference's `HybridConfig(**json)` refuses them too)."""
        if not isinstance(hybrid, dict) or not isinstance(llama, dict):
            raise CheckpointError(f"{where}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"llama"}
        for key in hybrid:
            if key not in known:
                raise CheckpointError(f"{where}: {key}: unknown key")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if not isinstance(llama.get(key), int):
                raise CheckpointError(f"{where}: config.json `{key}` is missing or not an integer")
        if hybrid.get("n_layer", llama["num_hidden_layers"]) != llama["num_hidden_layers"]:
            raise CheckpointError(f"{where}: n_layer {hybrid.get('n_layer')} differs from "
                                  f"config.json num_hidden_layers {llama['num_hidden_layers']}")
        try:
            return cls(**hybrid, llama=dict(llama))
        except (TypeError, CheckpointError) as e:
            raise CheckpointError(f"{where}: {e}") from None

    def llama_config(self) -> dict:
        """`config.json` as the reference saves it: the teacher's Llama config, the hybrid's
        architecture name, `head_dim` and `use_cache`."""
        out = dict(self.llama)
        out["architectures"] = ["CustomLlamaForCausalLM"]
        out.setdefault("head_dim", self.hidden_size // int(out.get("num_attention_heads", 1)))
        out["use_cache"] = True
        return out


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise CheckpointError(f"{key}: {msg}")


def is_zebra_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / HYBRID_CONFIG).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_layout(path: str | os.PathLike) -> ZebraLayout:
    """The `ZebraLayout` of a reference-format directory (its two JSON files)."""
    p = Path(path)
    return ZebraLayout.from_files(_read_json(p / HYBRID_CONFIG), _read_json(p / "config.json"),
                                  str(p / HYBRID_CONFIG))


class ZebraTensors(Mapping):
    """Lazy {name: np.ndarray} over a directory's safetensors (one file or shards + index):
    each access reads one tensor through a memory map; `shape(name)` reads only the header."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if (p / INDEX).is_file():
            weight_map = _read_json(p / INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{p / INDEX}: no `weight_map` object")
            self._files = {k: p / v for k, v in weight_map.items()}
        elif (p / SINGLE).is_file():
            with self._open(p / SINGLE) as f:
                self._files = {k: p / SINGLE for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
        else:
            raise CheckpointError(f"{p}: no {SINGLE} or {INDEX}")
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="np")
        except Exception as e:  # noqa: BLE001 - any reader error
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None

    def _handle(self, name: str):
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(self._open(file))
        return self._handles[file]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise KeyError(name)
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._stack.close()


def check_tensor_names(layout: ZebraLayout, shapes: Mapping[str, tuple[int, ...]],
                       where: str) -> None:
    """One line naming the first missing, unexpected or mis-shaped tensor."""
    want = layout.tensor_shapes()
    for name, shape in want.items():
        if name not in shapes:
            raise CheckpointError(f"{where}: tensor {name} is missing")
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {list(shapes[name])}, "
                                  f"the layout says {list(shape)}")
    extra = [n for n in shapes if n not in want]
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} (not in the layout of "
                              f"{HYBRID_CONFIG})")


def read_zebra(path: str | os.PathLike) -> tuple[ZebraLayout, ZebraTensors]:
    """(layout, lazy tensors) of a reference-format directory; every tensor name and shape is
    checked against the layout before anything is read."""
    layout = read_layout(path)
    tensors = ZebraTensors(path)
    check_tensor_names(layout, {n: tensors.shape(n) for n in tensors}, str(path))
    return layout, tensors


def write_zebra(out_dir: str | os.PathLike, layout: ZebraLayout,
                tensors: Iterable[tuple[str, np.ndarray]], generation_config: dict | None = None,
                tokenizer=None, *, overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write `config.json`, `hybrid_config.json`, `generation_config.json` (when given, HF
    form), the safetensors (`model.safetensors`, or shards + index past `max_shard_bytes`) and
    the tokenizer, atomically. Names and shapes are checked against the layout as they come."""
    want = layout.tensor_shapes()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        from jaxllama.checkpoint.hf import write_safetensors  # hf imports the package: on use
        seen: dict[str, tuple[int, ...]] = {}

        def checked():
            for name, a in tensors:
                a = np.ascontiguousarray(a)
                seen[name] = a.shape
                if name not in want:
                    raise CheckpointError(f"{name}: not a tensor of this layout")
                yield name, a

        write_safetensors(checked(), tmp, max_shard_bytes)
        check_tensor_names(layout, seen, str(out_dir))
        (tmp / "config.json").write_text(json.dumps(layout.llama_config(), indent=2))
        (tmp / HYBRID_CONFIG).write_text(json.dumps(layout.hybrid_config(), indent=4))
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return str(Path(out_dir).absolute())


__all__ = ["HYBRID_CONFIG", "ZebraLayout", "ZebraTensors", "check_tensor_names", "is_zebra_dir",
           "read_layout", "read_zebra", "write_zebra"]
