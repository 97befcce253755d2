"""`python -m jaxllama.train` end to end: the CI tiny run (8 simulated devices, data x seq mesh,
ring attention) interrupted by SIGINT, resumed, stopped by SIGTERM and resumed gives the same losses
as an uninterrupted run;
bad configs are one-line errors with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/train/tiny.yaml"


def _env(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               # the runs compile the same programs: share them through the disk cache (the test
               # run's, tests/conftest.py, so other tests' runs of the tiny config share them too)
               JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR")
               or str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)
    return env


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "jaxllama.train", "--config", TINY,
            f"checkpoint.dir={run_dir}/ckpt", f"log.dir={run_dir}", *extra]


def _losses(run_dir) -> dict[int, float]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run appends: last entry wins


def _steps(run_dir):
    d = Path(run_dir) / "ckpt"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path):
    env = _env(tmp_path)
    full = subprocess.run(_cmd(tmp_path / "full"), check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    reference = _losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, 31))
    assert reference[30] < reference[1] - 1.0  # it learns
    assert (tmp_path / "full" / "tensorboard").is_dir()

    # interrupted at step 7 by SIGINT, resumed, stopped at step 15 by SIGTERM, resumed: the run
    # sends itself the real signal right after the step (a signal from outside takes the same
    # path but would race a 50 ms step); it saves and exits with 130 (SIGINT) or 0 (SIGTERM)
    run = tmp_path / "cut"
    cut = subprocess.run(_cmd(run, "checkpoint.preempt_at_step=7", "checkpoint.every=10",
                              "checkpoint.preempt_signal=SIGINT"),
                         check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert cut.returncode == 130, cut.stderr[-2000:]
    assert "stopped by SIGINT at step 7" in cut.stderr
    assert max(_losses(run)) == 7
    assert _steps(run) == [1, 7]  # orbax's save of the first step and the SIGINT save
    cut = subprocess.run(_cmd(run, "checkpoint.preempt_at_step=15", "checkpoint.every=10"),
                         check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert f"resumed from {run / 'ckpt'} step 7" in cut.stderr
    assert "stopped by SIGTERM at step 15" in cut.stderr
    assert max(_losses(run)) == 15
    assert _steps(run) == [10, 15]  # the periodic save at 10 and the SIGTERM save at 15

    resumed = subprocess.run(_cmd(run), check=False, cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'ckpt'} step 15" in resumed.stderr
    losses = _losses(run)
    # same batches and states after each restart: the losses agree exactly
    assert losses[30] == reference[30]
    for step in range(1, 31):
        assert losses[step] == reference[step], step


@pytest.mark.parametrize("override, message", [
    (["train.stepz=3"], "configs/train/tiny.yaml: train.stepz: unknown key"),
    (["train.lr=fast"], "configs/train/tiny.yaml: train.lr: expected a number, got 'fast'"),
    (["mesh.data=3"], "configs/train/tiny.yaml: mesh: axis sizes multiply to 12 but there are 8"),
    (["train.seq_len=36", "train.loss_chunk=0"],
     "configs/train/tiny.yaml: train.seq_len: 36 is not divisible by 8"),
    (["model.attention.num_headz=4"], "model.attention.num_headz: unknown key"),
])
def test_bad_config_is_one_line_error(tmp_path, override, message):
    out = subprocess.run(_cmd(tmp_path / "bad", *override), check=False,
                         cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith(("INFO", "W", "I"))]
    assert lines == [f"error: {message}"] or (len(lines) == 1 and message in lines[0]), out.stderr
    assert not (tmp_path / "bad").exists()  # nothing written
