"""Per-op implementation tables, `resolve()`, and the check that a kernel really ran.

Each op (`attention`, and `ssm_scan` next) registers itself from its `api.py`:

    register("attention", auto={"gpu": "pallas_gpu", "tpu": "pallas_tpu"},
             implementations={"xla": load_reference, "pallas_gpu": load_gpu, ...})

Implementation names are shared by every op (`IMPLEMENTATIONS`; `KernelConfig` validates its
per-op fields against the same list): `xla` (the op's pure-jnp reference, any platform, required),
`xla_masked` (attention only: a few large masked products instead of the blockwise loop, any
platform), `pallas_interpret` (the GPU kernel body run by the Pallas interpreter, any platform),
`pallas_gpu`,
`pallas_tpu`, and `auto`, which reads the op's own table: platform -> implementation, `xla` where the
platform is not listed, logged once per (op, platform). A named implementation never falls back:
`resolve` raises `UnavailableImplementation` when the op does not have it or this machine cannot
run it. The values of `implementations` are zero-argument loaders (Pallas modules import lazily);
`implementation(op, name)` resolves a name and calls its loader.

`emulate_tpu()` makes `pallas_tpu` runnable on a machine without a TPU by running the Mosaic TPU
kernels under `pltpu.InterpretParams()`: an explicit opt-in for tests (the same kernel bodies, the
TPU interpreter simulating VMEM/SMEM and the grid), never a silent substitute. `assume_platform()`
makes resolution act as on another platform, for tests that lower (never run) a program for a
device this machine does not have (`jax.export`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax

IMPLEMENTATIONS = ("auto", "xla", "xla_masked", "pallas_interpret", "pallas_gpu", "pallas_tpu")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

log = logging.getLogger("jaxllama.kernels")
_logged: set[tuple[str, str]] = set()
_state = threading.local()


class UnavailableImplementation(RuntimeError):
    """A named implementation cannot run here (wrong platform, missing backend, or the op has no
    implementation of that name)."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One op's table: its `auto` choice per platform and its implementations' loaders."""

    name: str
    auto: Mapping[str, str]
    implementations: Mapping[str, Callable[[], Any]]


_OPS: dict[str, Op] = {}


def register(op: str, *, auto: Mapping[str, str],
             implementations: Mapping[str, Callable[[], Any]]) -> Op:
    """Register (or re-register, on module reload) op `op`. Every name must be one of
    `IMPLEMENTATIONS` (not `auto`), `xla` must be present (the reference runs anywhere), and every
    `auto` choice must be one of the op's implementations."""
    names = set(implementations)
    bad = names - set(IMPLEMENTATIONS[1:])
    if bad:
        raise ValueError(f"{op}: implementation names {sorted(bad)} are not in {IMPLEMENTATIONS[1:]}")
    if "xla" not in names:
        raise ValueError(f"{op}: an op must register its 'xla' reference implementation")
    auto = {_PLATFORM_ALIASES.get(p, p): name for p, name in auto.items()}
    missing = {name for name in auto.values() if name not in names}
    if missing:
        raise ValueError(f"{op}: auto chooses {sorted(missing)}, which {op} does not implement")
    entry = Op(op, dict(auto), dict(implementations))
    _OPS[op] = entry
    return entry


def op_table(op: str) -> Op:
    if op not in _OPS:
        raise KeyError(f"kernel op {op!r} is not registered (registered: {sorted(_OPS)})")
    return _OPS[op]


def platform() -> str:
    """The platform implementations are resolved for: `gpu`, `tpu`, `cpu`, ..."""
    assumed = getattr(_state, "platform", None)
    plat = assumed or jax.default_backend()
    return _PLATFORM_ALIASES.get(plat, plat)


@contextlib.contextmanager
def emulate_tpu():
    """Within this context `pallas_tpu` runs its Mosaic TPU kernels in the TPU interpreter."""
    before = getattr(_state, "emulate_tpu", False)
    _state.emulate_tpu = True
    try:
        yield
    finally:
        _state.emulate_tpu = before


@contextlib.contextmanager
def assume_platform(name: str):
    """Within this context resolution acts as on platform `name` (for lowering tests with
    `jax.export` to a device this machine lacks; running such a program here would fail)."""
    before = getattr(_state, "platform", None)
    _state.platform = name
    try:
        yield
    finally:
        _state.platform = before


def tpu_interpret_params():
    """`pltpu.InterpretParams()` inside `emulate_tpu()`, else None (compile for the real TPU)."""
    if not getattr(_state, "emulate_tpu", False):
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def resolve(name: str, op: str) -> str:
    """The concrete implementation of `op` that `name` stands for here; raises if it cannot run."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{op} implementation {name!r} is not one of {IMPLEMENTATIONS}")
    table = op_table(op)
    plat = platform()
    if name == "auto":
        chosen = table.auto.get(plat, "xla")
        if (op, plat) not in _logged:
            _logged.add((op, plat))
            log.info("%s: implementation 'auto' on platform %r runs %r", op, plat, chosen)
        return chosen
    if name not in table.implementations:
        raise UnavailableImplementation(
            f"{op} has no implementation {name!r} (it has {sorted(table.implementations)})")
    if name == "pallas_gpu" and plat != "gpu":
        raise UnavailableImplementation(
            f"{op} implementation 'pallas_gpu' needs a CUDA GPU, but JAX runs on {plat!r} "
            "(use 'pallas_interpret' to run the same kernel on CPU, or 'xla')")
    if name == "pallas_tpu" and plat != "tpu" and not getattr(_state, "emulate_tpu", False):
        raise UnavailableImplementation(
            f"{op} implementation 'pallas_tpu' needs a TPU, but JAX runs on {plat!r} "
            "(wrap the call in jaxllama.kernels._dispatch.emulate_tpu() to interpret it, "
            "or use 'xla')")
    return name


def implementation(op: str, name: str):
    """(resolved name, what the loader of that implementation returns)."""
    chosen = resolve(name, op)
    return chosen, op_table(op).implementations[chosen]()


def compiled_text(fn, *args, **kwargs) -> str:
    """The optimized HLO of `jax.jit(fn)(*args, **kwargs)`, op metadata included; `fn` may also
    be an already compiled program (`jax.stages.Compiled`, then no args)."""
    if hasattr(fn, "as_text") and not args and not kwargs:
        return fn.as_text()
    return jax.jit(fn).lower(*args, **kwargs).compile().as_text()


def kernel_names(hlo_text: str) -> set[str]:
    """Names of this package's Pallas kernels (prefix `jaxllama_`) in compiled HLO text: on GPU/TPU
    the custom call carries the kernel name; in interpret mode the kernel's ops keep it in their
    metadata. An implementation that silently fell back would leave none."""
    return set(re.findall(r"jaxllama_[a-z0-9_]+", hlo_text))


def kernels_in(fn, *args, **kwargs) -> set[str]:
    """`kernel_names` of the compiled `jax.jit(fn)(*args, **kwargs)` (or of a compiled program)."""
    return kernel_names(compiled_text(fn, *args, **kwargs))


def assert_kernel_ran(name: str, fn, *args, **kwargs) -> None:
    """Raise AssertionError unless kernel `name` is compiled into `jax.jit(fn)(*args)`; `fn` may be
    a compiled program, checked without compiling again."""
    found = kernels_in(fn, *args, **kwargs)
    if name not in found:
        raise AssertionError(f"kernel {name!r} is not in the compiled HLO (found {sorted(found)})")
