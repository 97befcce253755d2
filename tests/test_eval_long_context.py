"""scripts/eval_long_context.py without the long runs: passkey prompts (exact length, key-free
prefix), the report (plots, table, cells not run), resumable state, and bad flags."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("eval_long_context",
                                                  ROOT / "scripts" / "eval_long_context.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_passkey_prompt(ev, smollm2_jax):
    tok = smollm2_jax.tokenizer
    prefix, rest = ev.passkey_prompt(tok, 1024, 256, 12345)
    assert len(prefix) == 256 and len(prefix) + len(rest) == 1024
    text = tok.decode(rest.tolist())
    assert text.startswith("The pass key is 12345.") and text.endswith(ev.QUESTION)
    assert tok.decode(prefix.tolist()).startswith(ev.INTRO.strip()[:20])
    prefix2, rest2 = ev.passkey_prompt(tok, 1024, 256, 67890)
    assert (prefix2 == prefix).all() and len(rest2) == len(rest) and (rest2 != rest).any()
    empty, whole = ev.passkey_prompt(tok, 512, 0, 11111)
    assert len(empty) == 0 and len(whole) == 512
    with pytest.raises(ValueError, match="cannot hold the needle"):
        ev.passkey_prompt(tok, 512, 500, 11111)


def test_report(ev, tmp_path):
    lengths, depths = [2048, 8192], [0.1, 0.9]
    ppl = {"dense": {"ppl@2048": 10.0, "ppl@8192": 9.5, "seconds": 3.0, "peak_rss_gb": 1.0,
                     "bin_ppl": [12.0, 10.0, 9.0, 30.0]}}
    keys = {"lambda": {"2048/0.1": {"length": 2048, "depth": 0.1, "trials": 10, "correct": 3}}}
    ev.plot_ppl(ppl, 2048, tmp_path / "ppl.png")
    ev.plot_passkey(keys, lengths, depths, tmp_path / "passkey.png")
    for name in ("ppl.png", "passkey.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = {"command": "python x", "machine": "m", "date": "d", "seconds": 60.0,
            "cpu_minutes": 2.0, "peak_rss_gb": 1.5, "models": {"dense": "all dense"}}
    md = ev.markdown(meta, ppl, keys, lengths, depths)
    assert "| dense | 10.00 | 9.50 | 3 | 1.0 GB |" in md
    assert "| lambda | 10% | 3/10 | not run |" in md and "| lambda | 90% | not run | not run |" in md


def test_partial_state_round_trip(ev, tmp_path):
    path = tmp_path / "state.json"
    state = ev.Partial(str(path))
    state.data["passkey"]["lambda"] = {"2048/0.5": {"correct": 10, "trials": 10}}
    state.save()
    assert json.loads(path.read_text())["passkey"]["lambda"]["2048/0.5"]["correct"] == 10
    assert ev.Partial(str(path)).data == state.data
    assert ev.Partial(None).data == {"perplexity": {}, "passkey": {}, "runs": []}


def test_needle_distance_and_min_distance(ev, smollm2_jax):
    """The needle ends `needle_distance` tokens before the answer; cells closer than
    --min-distance (a FoT local window) are skipped without running the model."""
    tok = smollm2_jax.tokenizer
    needle = tok.encode("The pass key is 10000. Remember it. 10000 is the pass key.\n",
                        add_special_tokens=False)
    assert ev.needle_distance(tok, 1024, 256) == 1024 - 256 - len(needle)
    out, saved = {}, []
    ev.passkey(None, tok, [1024], [0.5, 0.9], {1024: 1}, 256, 0, out, lambda: saved.append(1),
               min_distance=1024)
    assert out == {} and saved == []


@pytest.mark.parametrize("args, words", [
    (["--chunk", "100"], ["--chunk", "multiple of 256"]),
    (["--ppl-models", "dense,mamba"], ["unknown model", "mamba"]),
    (["--depths", "0.5,2"], ["--depths", "[0, 1]"]),
    (["--trials", "2048"], ["--trials", "LENGTH:TRIALS"]),
    (["--passkey-models", "dense,fot"], ["model fot", "--fot-checkpoint"]),
])
def test_bad_flags(ev, tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        ev.main(["--out", str(tmp_path / "out"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused(ev, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        ev.main(["--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_runner_chunked_matches_one_forward(ev, smollm2_jax):
    """Chunked NLL through the cache equals one full forward; `feed` (last logits only) agrees."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllama.model import Transformer

    ck = smollm2_jax
    ids = np.asarray(ck.tokenizer.encode(ev.natural_text()[:4000]), np.int32)[:512]
    runner = ev.Runner(ck.config, ck.params, 256)
    nll, last, _ = runner.run(ids, 0, runner.new_cache(len(ids)))
    logits, _ = Transformer(ck.config).apply({"params": ck.params}, jnp.asarray(ids[None]))
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    want = -np.take_along_axis(np.asarray(logp[:-1]), ids[1:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(nll, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(last), np.asarray(logits[0, -1]), rtol=1e-4, atol=1e-4)
    fed, _ = runner.feed(ids, 0, runner.new_cache(len(ids)))
    # a [1 D] x [D V] product instead of rows of [C D] x [D V]: float32 rounding differs
    np.testing.assert_allclose(np.asarray(fed), np.asarray(last), rtol=1e-4, atol=1e-4)
    assert int(np.argmax(fed)) == int(np.argmax(last))


def test_report_only_from_state(ev, tmp_path, smollm2_jax, capsys):
    """--report-only writes plots and tables from --partial alone: no new runs recorded, cells
    missing from the state shown as not run, the peak RSS the largest one recorded."""
    cell = {"length": 2048, "depth": 0.9, "trials": 10, "correct": 7, "peak_rss_gb": 55.5,
            "seconds": 1.0}
    state = {"perplexity": {}, "passkey": {"dense": {"2048/0.9": cell}},
             "runs": [{"command": "python earlier", "cpu_minutes": 3.0, "seconds": 120.0,
                       "date": "2026-01-01"}]}
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    out = tmp_path / "out"
    assert ev.main(["--out", str(out), "--partial", str(path), "--report-only", "--ppl-models=",
                    "--passkey-models", "dense", "--lengths", "2048,4096",
                    "--depths", "0.1,0.9"]) == 0
    assert json.loads(path.read_text()) == state
    md = (out / "results.md").read_text()
    assert "| dense | 10% | not run | not run |" in md and "| dense | 90% | 7/10 | not run |" in md
    assert "Command: `python earlier`" in md and "peak RSS 55.5 GB" in md
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG" and not (out / "ppl.png").exists()
    assert json.loads((out / "results.json").read_text())["passkey"] == state["passkey"]


def test_report_only_needs_state(ev, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--out", str(tmp_path / "out"), "--report-only",
                 "--partial", str(tmp_path / "missing.json")])
    assert e.value.code == 2 and "--report-only needs --partial" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _EchoRunner:
    """Stands in for `Runner`: records what `feed` receives and answers with the first 5-digit
    number of everything fed so far (a model that reads its whole context perfectly)."""

    chunk = 256

    def __init__(self, tok, whole: bool):
        self.tok, self.whole, self.calls = tok, whole, []

    def chunk_for(self, n):  # a FoT-like model asks for the whole prompt
        return n if self.whole else self.chunk

    def new_cache(self, max_len):
        return ()

    def feed(self, ids, start, cache):
        self.calls.append((start, len(ids)))
        return None, cache + (self.tok.decode(list(ids)),)

    def greedy(self, last, cache, position, n):
        digits = "".join(ch if ch.isdigit() else " " for ch in "".join(cache)).split()
        return self.tok.encode(" " + next(d for d in digits if len(d) == 5),
                               add_special_tokens=False)


@pytest.mark.parametrize("whole", [False, True])
def test_passkey_feeding(ev, smollm2_jax, whole):
    """Chunked models share the key-free prefix across trials (fed once, then each trial's rest
    from its end); models that take a prompt whole (FoT) get each trial's full prompt in one
    call from position 0, as the reference windows it. Either way every trial is scored."""
    tok = smollm2_jax.tokenizer
    runner = _EchoRunner(tok, whole)
    out = {}
    ev.passkey(runner, tok, [1024], [0.5], {1024: 3}, 256, 0, out, lambda: None)
    assert out["1024/0.5"]["correct"] == 3
    prefix, rest = ev.passkey_prompt(tok, 1024, 512, 12345)
    if whole:
        assert runner.calls == [(0, 1024)] * 3
    else:
        assert runner.calls == [(0, len(prefix))] + [(len(prefix), len(rest))] * 3


def test_runner_chunk_follows_the_kinds(ev, smollm2_jax):
    """`Runner.chunk_for` is the engine's rule: a FoT model's prompt goes whole, dense keeps
    the runner's chunk."""
    from jaxllama.checkpoint.base import with_overrides

    ck = smollm2_jax
    fot = with_overrides(ck.config, ["model.layer_pattern=fot_local*29,fot"])
    assert ev.Runner(fot, None, 256).chunk_for(4096) == 4096
    assert ev.Runner(ck.config, None, 256).chunk_for(4096) == 256
