"""XLA:CPU flags chosen by the host CPU's features, set before JAX creates its CPU backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, so `apply()` (called when
`jaxllama` is imported) only helps if nothing has run a JAX computation yet; after that it
changes nothing and says so in its return value. The user always wins: a flag named in the
user's own `XLA_FLAGS` is never overridden, and `JAXLLAMA_XLA_FLAGS=0` turns the selection off
(`JAXLLAMA_XLA_FLAGS=<flags>` replaces it with the given flags).

A rule enters `RULES` only with a before/after measurement on a CPU that has its features
(BENCHMARKS.md, "CPU flags") and the parity tests passing with it: a flag may change the order
of floating-point sums, never results beyond the dtype's tolerance. On a CPU no rule matches
(e.g. AVX2 without bfloat16 units, where no flag tried measured faster) nothing is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "JAXLLAMA_XLA_FLAGS"


@dataclass(frozen=True)
class CpuInfo:
    """The host CPU: its model name and its /proc/cpuinfo feature flags."""

    model: str
    features: frozenset[str]

    @property
    def bfloat16_units(self) -> bool:
        """bfloat16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
        return bool(self.features & {"avx512_bf16", "amx_bf16"})

    def summary(self) -> str:
        """The features that decide CPU code paths, for benchmark headers: e.g. `avx2 fma`."""
        keys = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
        return " ".join(k for k in keys if k in self.features) or "none of " + " ".join(keys)


def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """The first CPU's model name and flags (empty when the file cannot be read)."""
    model, flags = "unknown CPU", frozenset()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if flags and model != "unknown CPU":
                    break
    except OSError:
        pass
    return CpuInfo(model, flags)


# (required features, flags): the first rule whose features the CPU has all of applies. Each
# entry needs its measurement in BENCHMARKS.md ("CPU flags"). On AVX2 without bfloat16 units
# (AMD EPYC, 2026-12-01) --xla_cpu_use_onednn, --xla_cpu_use_xnnpack and
# --xla_cpu_experimental_xnn_fusion_type=dot showed no consistent gain on the prefill product or
# the decode matrix-vector products (measured under heavy load), so no rule is keyed to avx2; a
# CPU with avx512_bf16 / amx_bf16 still needs its own measurement before a rule enters.
RULES: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = ()


def select(info: CpuInfo) -> tuple[str, ...]:
    """The XLA flags for this CPU (`RULES`)."""
    for needs, flags in RULES:
        if needs <= info.features:
            return flags
    return ()


def merge(user: str, ours: tuple[str, ...]) -> str:
    """`user`'s XLA_FLAGS plus each of `ours` whose flag name the user does not set."""
    named = {f.split("=", 1)[0] for f in user.split()}
    extra = [f for f in ours if f.split("=", 1)[0] not in named]
    return " ".join([*user.split(), *extra])


def _backend_started() -> bool:
    import sys

    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(xb is not None and getattr(xb, "_backends", None))


def apply(environ=os.environ, info: CpuInfo | None = None) -> tuple[str, ...]:
    """Add the selected flags to `environ["XLA_FLAGS"]`; returns the flags added (none when
    JAX's backend already exists, `JAXLLAMA_XLA_FLAGS=0`, or no rule matches)."""
    setting = environ.get(ENV, "")
    if setting == "0" or _backend_started():
        return ()
    ours = tuple(setting.split()) if setting else select(info or cpu_info())
    user = environ.get("XLA_FLAGS", "")
    merged = merge(user, ours)
    if merged != user:
        environ["XLA_FLAGS"] = merged
    return tuple(f for f in merged.split() if f not in user.split())


__all__ = ["RULES", "CpuInfo", "apply", "cpu_info", "merge", "select"]
