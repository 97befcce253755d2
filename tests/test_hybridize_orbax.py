"""`convert hybridize --to orbax`: the hybrid written as a jaxllama orbax directory loads with
`from_pretrained` and gives the same logits as the same hybrid written in the reference format;
bad requests are one line, exit status 1, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllama.api import from_pretrained
from jaxllama.checkpoint import checkpoint_format
from jaxllama.convert import main
from jaxllama.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "tests" / "fixtures" / "zebra-tiny" / "teacher"
TINY = ["--mla-layers", "0,2", "--q-lora-rank", "32", "--kv-lora-rank", "16",
        "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "8", "--seed", "3"]


def test_orbax_output_loads_with_the_reference_formats_logits(tmp_path, capsys):
    zebra, orbax = tmp_path / "zebra", tmp_path / "orbax"
    assert main(["hybridize", "--input", str(TEACHER), "--output", str(zebra), *TINY]) == 0
    assert main(["hybridize", "--input", str(TEACHER), "--output", str(orbax), "--to", "orbax",
                 *TINY]) == 0
    assert "orbax format" in capsys.readouterr().out
    assert checkpoint_format(zebra) == "zebra" and checkpoint_format(orbax) == "orbax"
    a, b = from_pretrained(zebra, compile_cache=False), from_pretrained(orbax, compile_cache=False)
    assert a.config == b.config
    assert b.config.layer_pattern == ("mla", "mamba2", "mla", "mamba2")
    ids = np.random.default_rng(0).integers(3, 256, (2, 24)).astype(np.int32)
    forward = jax.jit(lambda p, x: Transformer(a.config).apply({"params": p}, x)[0])  # one compile
    la, lb = np.asarray(forward(a.params, ids)), np.asarray(forward(b.params, ids))
    assert la.shape == (2, 24, 256) and np.abs(la).max() > 1.0
    np.testing.assert_array_equal(la, lb)
    assert a.generation_config["eos_token_ids"] == b.generation_config["eos_token_ids"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--ssm", "mamba"], "--to orbax: --ssm mamba hybrids have no jaxllama layer kind"),
    (["--kv-lora-rank", "999"], "kv_lora_rank 999 is outside"),
])
def test_bad_orbax_requests_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "h"
    assert main(["hybridize", "--input", str(TEACHER), "--output", str(out), "--to", "orbax",
                 *TINY, *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling


def test_non_empty_output_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "h"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["hybridize", "--input", str(TEACHER), "--output", str(out), "--to", "orbax",
                 *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty directory" in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]
