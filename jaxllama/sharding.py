"""Logical axis names, the one rules table mapping them to mesh axes, `make_mesh`, `constrain`.

Model code names logical axes only ("batch", "embed", "q_heads", ...); only this file knows the
mesh axes `data`, `fsdp`, `tensor`, `seq`. Parameters, optimizer state (which mirrors the
parameters), activations and caches all go through `RULES`:

- parameters: `nn.with_logical_partitioning` metadata -> `param_shardings` (boxed `init` output);
- optimizer state: `opt_state_shardings` maps each parameter-shaped leaf to its parameter's
  sharding;
- activations: `constrain(x, ("batch", "seq", "act_embed"))` inside `use_mesh(mesh)`;
- caches: `axes_shardings(jaxllama.model.cache_logical_axes(cfg), mesh)`.

A dimension whose size the mesh axes do not divide is replicated rather than failing to compile
(tiny test models, odd vocabularies); `param_shardings` logs each such fallback once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxllama.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "seq")
# Device-grid order: tensor innermost (the most traffic), then seq (ring neighbours), fsdp, data.
_GRID_ORDER = ("data", "fsdp", "seq", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Every name here is named by
# a parameter, a cache's logical axes or a `constrain` call; a new layer kind adds the names its
# weights and caches use. A name missing from the table is replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "seq"),
    ("cache_seq", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("act_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("q_lora", None),  # MLA's query and kv latents (small; replicated)
    ("kv_lora", None),
    # Mamba1/Mamba2: the inner width E and Mamba2's heads over `tensor` (in_proj/dt_proj column-,
    # x_proj/out_proj row-parallel, A, D, norm and the SSM state split with them); the state,
    # conv taps, dt rank and the concatenated projections (ssm_proj, Mamba2's [x B C] conv) whole
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the four mesh axes; one of them may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    seq: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{name}: must be a positive size or -1, got {v}")
        if sum(getattr(self, n) == -1 for n in MESH_AXES) > 1:
            raise ConfigError("mesh: at most one axis may be -1")

    def resolve(self, num_devices: int, where: str = "mesh") -> dict[str, int]:
        """Concrete axis sizes for `num_devices`; a mesh that does not fit is a one-line error."""
        sizes = {n: getattr(self, n) for n in MESH_AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        free = [n for n, v in sizes.items() if v == -1]
        if free:
            if num_devices % fixed:
                raise ConfigError(f"{where}: fixed axes (product {fixed}) do not divide the "
                                  f"{num_devices} devices")
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(f"{where}: axis sizes multiply to {fixed} but there are "
                              f"{num_devices} devices")
        return sizes


def make_mesh(cfg: MeshConfig | dict | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes data, fsdp, seq, tensor (Auto axis types) over `devices` (default all)."""
    if cfg is None:
        cfg = MeshConfig()
    elif isinstance(cfg, dict):
        from jaxllama.config import from_dict

        cfg = from_dict(MeshConfig, cfg, "mesh")
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[n] for n in _GRID_ORDER)
    return jax.make_mesh(shape, _GRID_ORDER, axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def make_abstract_mesh(cfg: MeshConfig, num_devices: int) -> AbstractMesh:
    """A device-less mesh of the same axes, for `jax.eval_shape` of configs bigger than this host
    (e.g. validating a 64-accelerator recipe on a laptop)."""
    sizes = cfg.resolve(num_devices)
    shape = tuple(sizes[n] for n in _GRID_ORDER)
    return AbstractMesh(shape, _GRID_ORDER, axis_types=(AxisType.Auto,) * len(shape))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | AbstractMesh | None):
    """Make `mesh` and `RULES` current: `constrain` and context parallelism see them. None = no-op.
    Enter it outside `jax.jit` (a concrete mesh is set with `jax.set_mesh`)."""
    if mesh is None:
        yield
        return
    ctx = (jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, AbstractMesh)
           else jax.set_mesh(mesh))
    with ctx, nn.logical_axis_rules(RULES):
        yield


def constrain(x, names: Sequence[str | None]):
    """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(names))


def mesh_axis_size(axis: str) -> int:
    """Size of mesh axis `axis` in the current mesh (1 when no mesh is set)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]


def logical_to_mesh_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                         mesh: Mesh | None = None) -> PartitionSpec:
    """Mesh `PartitionSpec` for logical `names`; with `shape` and `mesh`, dims the mapped mesh
    axes do not divide are replicated. A mesh axis is used at most once per spec."""
    rules = dict(RULES)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(names):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                log.debug("dim %d (%s, size %d) not divisible by mesh %s: replicated",
                         i, name, shape[i], axes)
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, names: Sequence[str | None],
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(names, shape, mesh))


def _logical_names(leaf) -> tuple:
    if isinstance(leaf, nn.LogicallyPartitioned):
        return tuple(leaf.names)
    return (None,) * len(getattr(leaf, "shape", ()))


def param_shardings(boxed: Any, mesh: Mesh) -> Any:
    """NamedShardings for a parameter tree boxed with `nn.with_logical_partitioning` (e.g. the
    `jax.eval_shape(model.init, ...)["params"]`); unboxed leaves are replicated."""
    def one(leaf):
        value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
        return named_sharding(mesh, _logical_names(leaf), value.shape)

    return jax.tree.map(one, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_logical_axes(boxed: Any) -> Any:
    """The logical-axis-name tuple of every parameter (`nn.get_partition_spec` as tuples)."""
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def axes_shardings(axes: Any, mesh: Mesh, shapes: Any = None) -> Any:
    """NamedShardings for a tree whose leaves are logical-name tuples (e.g. cache_logical_axes);
    with `shapes` (a matching tree of arrays / ShapeDtypeStructs) indivisible dims replicate."""
    is_axes = lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a)
    if shapes is None:
        return jax.tree.map(lambda a: named_sharding(mesh, a), axes, is_leaf=is_axes)
    return jax.tree.map(lambda a, s: named_sharding(mesh, a, s.shape), axes, shapes,
                        is_leaf=is_axes)


def opt_state_shardings(tx, opt_state_shapes: Any, params_sharding: Any, mesh: Mesh) -> Any:
    """Optimizer state shardings: parameter-shaped leaves (Adam moments) follow their parameter;
    everything else (counts, scalars) is replicated."""
    import optax

    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx, lambda _, s: s, opt_state_shapes, params_sharding,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Token-like arrays [B T ...]: batch over (data, fsdp), sequence over seq."""
    names = ("batch", "seq") + (None,) * (ndim - 2)
    return named_sharding(mesh, names[:ndim])
