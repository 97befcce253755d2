"""Kernel dispatch: each op's own `auto` table per platform, and a named implementation never falls
back (it raises `UnavailableImplementation`), whatever the op; `KernelConfig` has one field per op,
validated against the shared names."""

import logging

import pytest
from jaxllama.kernels import _dispatch
from jaxllama.kernels._dispatch import UnavailableImplementation
from jaxllama.kernels.flash_attention import api  # noqa: F401  (registers "attention")

from jaxllama.config import ConfigError, KernelConfig


@pytest.fixture
def scan_like_op():
    """A second op with its own table: TPU kernel only, no GPU kernel (as a new op starts)."""
    loaded = []
    _dispatch.register("test_scan", auto={"tpu": "pallas_tpu"}, implementations={
        "xla": lambda: loaded.append("xla") or "reference",
        "pallas_tpu": lambda: loaded.append("pallas_tpu") or "tpu kernel"})
    yield loaded
    del _dispatch._OPS["test_scan"]


@pytest.mark.parametrize("plat,attention,scan", [
    ("cpu", "xla", "xla"), ("gpu", "pallas_gpu", "xla"), ("cuda", "pallas_gpu", "xla"),
    ("tpu", "pallas_tpu", "pallas_tpu")])
def test_auto_reads_each_ops_own_table(scan_like_op, plat, attention, scan):
    with _dispatch.assume_platform(plat):
        assert _dispatch.resolve("auto", "attention") == attention
        assert _dispatch.resolve("auto", "test_scan") == scan


def test_named_implementation_never_falls_back(scan_like_op):
    # an implementation the op does not have, even on a platform where another op has it
    with _dispatch.assume_platform("gpu"), pytest.raises(UnavailableImplementation,
                                                         match="test_scan has no .*'pallas_gpu'"):
        _dispatch.resolve("pallas_gpu", "test_scan")
    # one the op has, on the wrong platform (no emulation asked for)
    with pytest.raises(UnavailableImplementation, match="'pallas_tpu' needs a TPU"):
        _dispatch.resolve("pallas_tpu", "test_scan")
    with pytest.raises(UnavailableImplementation, match="'pallas_gpu' needs a CUDA GPU"):
        _dispatch.resolve("pallas_gpu", "attention")
    with _dispatch.emulate_tpu():
        assert _dispatch.implementation("test_scan", "pallas_tpu") == ("pallas_tpu", "tpu kernel")
    assert _dispatch.implementation("test_scan", "auto") == ("xla", "reference")  # CPU
    assert scan_like_op == ["pallas_tpu", "xla"]  # loaders run only for the chosen one
    with pytest.raises(ValueError, match="'cudnn' is not one of"):
        _dispatch.resolve("cudnn", "test_scan")
    with pytest.raises(KeyError, match="not registered"):
        _dispatch.resolve("xla", "no_such_op")


def test_register_rejects_inconsistent_tables():
    ref = {"xla": lambda: None}
    with pytest.raises(ValueError, match="does not implement"):
        _dispatch.register("bad", auto={"gpu": "pallas_gpu"}, implementations=ref)
    with pytest.raises(ValueError, match="'xla' reference"):
        _dispatch.register("bad", auto={}, implementations={"pallas_gpu": lambda: None})
    with pytest.raises(ValueError, match="not in"):
        _dispatch.register("bad", auto={}, implementations={**ref, "cudnn": lambda: None})
    assert "bad" not in _dispatch._OPS


def test_auto_logs_once_per_op_and_platform(scan_like_op, caplog):
    _dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="jaxllama.kernels"):
        for _ in range(2):
            assert _dispatch.resolve("auto", "attention") == "xla"  # CPU
            assert _dispatch.resolve("auto", "test_scan") == "xla"
    lines = [r.getMessage() for r in caplog.records if "'auto'" in r.getMessage()]
    assert len(lines) == 2 and any("attention" in x for x in lines), lines


def test_kernel_config_has_a_validated_field_per_op():
    assert KernelConfig().ssm_scan == "xla" and KernelConfig().attention == "xla"
    assert KernelConfig(ssm_scan="pallas_tpu").ssm_scan == "pallas_tpu"
    with pytest.raises(ConfigError, match="kernels.ssm_scan: 'cudnn' is not one of"):
        KernelConfig(ssm_scan="cudnn")
    with pytest.raises(ConfigError, match="kernels.attention: 'cudnn' is not one of"):
        KernelConfig(attention="cudnn")
