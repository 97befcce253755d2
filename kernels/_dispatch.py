"""Implementation names, `resolve()`, and the check that a kernel really ran.

Names: `xla` (the pure-jnp reference, any platform), `pallas_interpret` (the GPU kernel body run by
the Pallas interpreter, any platform), `pallas_gpu`, `pallas_tpu`, and `auto` (picks by platform and
logs its choice once). A named implementation never falls back: `resolve` raises when it cannot run.

`emulate_tpu()` makes `pallas_tpu` runnable on a machine without a TPU by running the Mosaic TPU
kernels under `pltpu.InterpretParams()`: an explicit opt-in for tests (the same kernel bodies, the
TPU interpreter simulating VMEM/SMEM and the grid), never a silent substitute.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading

import jax

IMPLEMENTATIONS = ("auto", "xla", "pallas_interpret", "pallas_gpu", "pallas_tpu")
_AUTO = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}

log = logging.getLogger("jaxllama.kernels")
_logged: set[tuple[str, str]] = set()
_state = threading.local()


class UnavailableImplementation(RuntimeError):
    """A named implementation cannot run here (wrong platform or missing backend)."""


def platform() -> str:
    return jax.default_backend()


@contextlib.contextmanager
def emulate_tpu():
    """Within this context `pallas_tpu` runs its Mosaic TPU kernels in the TPU interpreter."""
    before = getattr(_state, "emulate_tpu", False)
    _state.emulate_tpu = True
    try:
        yield
    finally:
        _state.emulate_tpu = before


def tpu_interpret_params():
    """`pltpu.InterpretParams()` inside `emulate_tpu()`, else None (compile for the real TPU)."""
    if not getattr(_state, "emulate_tpu", False):
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def resolve(name: str, op: str = "attention") -> str:
    """The concrete implementation `name` stands for here; raises if it cannot run."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{op} implementation {name!r} is not one of {IMPLEMENTATIONS}")
    plat = platform()
    if name == "auto":
        chosen = _AUTO.get(plat, "xla")
        if (op, plat) not in _logged:
            _logged.add((op, plat))
            log.info("%s: implementation 'auto' on platform %r runs %r", op, plat, chosen)
        return chosen
    if name == "pallas_gpu" and plat not in ("gpu", "cuda"):
        raise UnavailableImplementation(
            f"{op} implementation 'pallas_gpu' needs a CUDA GPU, but JAX runs on {plat!r} "
            "(use 'pallas_interpret' to run the same kernel on CPU, or 'xla')")
    if name == "pallas_tpu" and plat != "tpu" and not getattr(_state, "emulate_tpu", False):
        raise UnavailableImplementation(
            f"{op} implementation 'pallas_tpu' needs a TPU, but JAX runs on {plat!r} "
            "(wrap the call in jaxllama.kernels._dispatch.emulate_tpu() to interpret it, "
            "or use 'xla')")
    return name


def compiled_text(fn, *args, **kwargs) -> str:
    """The optimized HLO of `jax.jit(fn)(*args, **kwargs)`, op metadata included."""
    return jax.jit(fn).lower(*args, **kwargs).compile().as_text()


def kernel_names(hlo_text: str) -> set[str]:
    """Names of this package's Pallas kernels (prefix `jaxllama_`) in compiled HLO text: on GPU/TPU
    the custom call carries the kernel name; in interpret mode the kernel's ops keep it in their
    metadata. An implementation that silently fell back would leave none."""
    return set(re.findall(r"jaxllama_[a-z0-9_]+", hlo_text))


def kernels_in(fn, *args, **kwargs) -> set[str]:
    """`kernel_names` of the compiled `jax.jit(fn)(*args, **kwargs)`."""
    return kernel_names(compiled_text(fn, *args, **kwargs))


def assert_kernel_ran(name: str, fn, *args, **kwargs) -> None:
    """Raise AssertionError unless kernel `name` is compiled into `jax.jit(fn)(*args)`."""
    found = kernels_in(fn, *args, **kwargs)
    if name not in found:
        raise AssertionError(f"kernel {name!r} is not in the compiled HLO (found {sorted(found)})")
