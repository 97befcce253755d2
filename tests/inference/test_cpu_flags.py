"""XLA:CPU flag selection: features read from a cpuinfo file, rules by feature, the user's
XLA_FLAGS always win, JAXLLAMA_XLA_FLAGS overrides, nothing is set once JAX's backend exists."""

import pytest

from jaxllama import cpu_flags
from jaxllama.cpu_flags import CpuInfo

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16
processor\t: 1
model name\t: other
flags\t\t: fpu
"""


def test_cpu_info_reads_the_first_cpu(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = cpu_flags.cpu_info(str(path))
    assert info.model == "AMD EPYC 7B13"
    assert {"avx2", "avx512_bf16"} <= info.features and info.bfloat16_units
    assert info.summary() == "avx2 fma avx512f avx512_bf16"
    missing = cpu_flags.cpu_info(str(tmp_path / "absent"))
    assert missing.features == frozenset() and not missing.bfloat16_units


def test_rules_pick_by_feature(monkeypatch):
    rules = ((frozenset({"amx_bf16"}), ("--xla_a=1",)), (frozenset({"avx2"}), ("--xla_b=1",)))
    monkeypatch.setattr(cpu_flags, "RULES", rules)
    assert cpu_flags.select(CpuInfo("x", frozenset({"avx2", "amx_bf16"}))) == ("--xla_a=1",)
    assert cpu_flags.select(CpuInfo("x", frozenset({"avx2"}))) == ("--xla_b=1",)
    assert cpu_flags.select(CpuInfo("x", frozenset({"sse2"}))) == ()


def test_user_flags_win_and_the_override(monkeypatch):
    monkeypatch.setattr(cpu_flags, "_backend_started", lambda: False)
    info = CpuInfo("x", frozenset({"avx2"}))
    monkeypatch.setattr(cpu_flags, "RULES", ((frozenset({"avx2"}), ("--xla_a=1", "--xla_b=1")),))
    env = {"XLA_FLAGS": "--xla_a=0 --xla_c=2"}
    assert cpu_flags.apply(env, info) == ("--xla_b=1",)
    assert env["XLA_FLAGS"] == "--xla_a=0 --xla_c=2 --xla_b=1"
    env = {cpu_flags.ENV: "0"}
    assert cpu_flags.apply(env, info) == () and "XLA_FLAGS" not in env
    env = {cpu_flags.ENV: "--xla_z=3"}
    assert cpu_flags.apply(env, info) == ("--xla_z=3",) and env["XLA_FLAGS"] == "--xla_z=3"


def test_nothing_is_set_once_the_backend_exists(monkeypatch):
    import jax

    jax.devices()  # the backend exists from here on
    monkeypatch.setattr(cpu_flags, "RULES", ((frozenset(), ("--xla_a=1",)),))
    env = {}
    assert cpu_flags.apply(env, CpuInfo("x", frozenset())) == () and env == {}


@pytest.mark.parametrize("features", [frozenset(), frozenset({"avx2", "fma"})])
def test_no_rule_for_cpus_without_a_measured_gain(features):
    """AVX2-only CPUs (measured: no flag faster, BENCHMARKS.md) get no flags."""
    assert cpu_flags.select(CpuInfo("x", features)) == ()
