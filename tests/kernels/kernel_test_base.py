"""The kernel test base every op's tests reuse (STYLE.md section 6.6): a tolerance table per dtype on
relative error, fresh random inputs, a fast-compile helper, and the check that the kernel really
ran (its name in the compiled HLO, `_dispatch.assert_kernel_ran`).

How an op's test file uses it (flash attention: test_attention_kernels.py; ssm_scan next):

  1. Cases: one frozen dataclass per case with ragged, non-divisible shapes and a dtype (float32 or
     bfloat16); inputs from `fresh_normal` (seeded standard normal: never zeros, never reused
     across shapes).
  2. Truth: the op's specification (attention's naive softmax, the scan's sequential `lax.scan`)
     in float32 on the same (rounded) inputs, forward and `jax.vjp` gradients under random
     cotangents, compiled with `compile_fast` and cached per case.
  3. One test class per implementation, subclassing `KernelTestBase` and setting `implementation`
     and `kernels`: the Pallas kernel names that must appear in the compiled HLO (empty for `xla`,
     whose HLO must then name none, so a silent fallback or a stray kernel both fail).
  4. In a test: `got, compiled = self.run_compiled(fn, *args)` (the function under test compiled
     once, with `pltpu.InterpretParams()` available for `pallas_tpu`), then
     `self.assert_close("out", got, want, dtype)` per output and gradient, and
     `self.assert_kernels_ran(compiled)` (reads the already compiled HLO: no second compile).

An op whose outputs need other quantities (the scan's final state) extends the table with its own
keys in a subclass (`TOLERANCE = {**KernelTestBase.TOLERANCE, ...}` per dtype); a tolerance is
never loosened to make a case pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxllama.kernels import _dispatch

# Tiny shapes: compile time dominates, so LLVM optimizes less and XLA:CPU uses its older elemental
# emitters instead of the MLIR fusion emitters (same semantics; a case compiles about 2-3x faster).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

# max |got - want| / max |want| per dtype and quantity. bfloat16 inputs are compared with the
# float32 specification on the same (rounded) inputs, so the bound covers bf16 outputs and bf16
# matmul operands. `lse` is an absolute bound scaled by max(1, max |lse|).
TOLERANCE = {
    "float32": {"out": 1e-5, "lse": 1e-5, "grad": 3e-5},
    "bfloat16": {"out": 1.5e-2, "lse": 1e-4, "grad": 3e-2},
}


def compile_fast(fn, *args):
    """`jax.jit(fn)` lowered and compiled for these args with `FAST_COMPILE`; call it with the same
    args. Returns the `jax.stages.Compiled` (its `as_text()` is the HLO the kernel check reads)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def fresh_normal(seed: int, shapes, dtype) -> list[jax.Array]:
    """Standard-normal arrays of `shapes` in `dtype`, from a generator seeded by `seed` (fresh per
    case, reproducible per seed; never zeros, which would hide a missing term)."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dt) for shape in shapes]


def rel_err(got, want) -> float:
    """max |got - want| / max |want| in float32 (asserts got is finite)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


class KernelTestBase:
    """Subclass once per (op, implementation); see the module docstring."""

    implementation: str = "xla"
    kernels: tuple[str, ...] = ()  # Pallas kernel names the compiled HLO must hold, exactly
    TOLERANCE: dict[str, dict[str, float]] = TOLERANCE

    def tolerance(self, dtype, kind: str) -> float:
        return self.TOLERANCE[jnp.dtype(dtype).name][kind]

    def assert_close(self, kind: str, got, want, dtype, name: str = "") -> None:
        """Relative error of got against want within the table's bound for (dtype, kind); got
        must have `dtype` and be finite."""
        assert got.dtype == jnp.dtype(dtype), (name or kind, got.dtype, dtype)
        err = rel_err(got, want)
        assert err <= self.tolerance(dtype, kind), (name or kind, err)

    def run_compiled(self, fn, *args):
        """(fn(*args) from one fast compile, the compiled program). `pallas_tpu` runs its kernels
        in the TPU interpreter here (`_dispatch.emulate_tpu`)."""
        with _dispatch.emulate_tpu():
            compiled = compile_fast(fn, *args)
            return compiled(*args), compiled

    def assert_kernels_ran(self, compiled) -> None:
        """Each of `kernels` is in the compiled HLO and no other of this package's kernels is (so
        `xla` runs none, and a Pallas implementation cannot silently fall back)."""
        for name in self.kernels:
            _dispatch.assert_kernel_ran(name, compiled)
        found = _dispatch.kernels_in(compiled)
        assert found == set(self.kernels), (self.implementation, sorted(found))
