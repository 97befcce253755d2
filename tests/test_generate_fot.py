"""`python -m jaxllama.generate` runs a FoT (LongLLaMA-format) checkpoint: the LongLLaMA parity
fixture's model (window 32, last context 16, memory layers 1 and 3) saved with the byte tokenizer;
a prompt longer than the local window goes through memory, decode evicts the local window, and the
CLI's greedy tokens are the engine's. The CLI runs in a subprocess while the engine runs here."""

import json
import os
import subprocess
import sys
from pathlib import Path

from jaxllama.checkpoint import load_checkpoint, save_hf
from jaxllama.inference.engine import Engine
from jaxllama.inference.sampling import SamplingConfig
from jaxllama.mixers import spec_of
from jaxllama.training.data import byte_tokenizer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "longllama-tiny"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLLAMA_COMPILE_CACHE": ""}
# ASCII: one byte token per character, all below the fixture's 256-token vocabulary; 48 tokens =
# one window of 32 (into memory) + the tail of 16: the fewest pieces (programs compile faster)
PROMPT = "A focused transformer keeps its memory of keys.."
NEW = 24


def test_generate_cli_greedy_tokens_are_the_engines(tmp_path):
    ref = load_checkpoint(str(FIXTURE))
    path = save_hf(ref.config, ref.params, byte_tokenizer(), tmp_path / "fot",
                   ref.generation_config)
    assert json.loads((tmp_path / "fot" / "config.json").read_text())["model_type"] == "longllama"
    cli = subprocess.Popen(
        [sys.executable, "-m", "jaxllama.generate", "--checkpoint", path, "--prompt", PROMPT,
         "--no-chat", "--json", "--max-new-tokens", str(NEW)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ck = load_checkpoint(path)
        assert ck.config == ref.config
        ids = list(ck.tokenizer(PROMPT)["input_ids"])
        assert ids == list(PROMPT.encode()) and max(ids) < ck.config.vocab_size
        fot = spec_of("fot").config(ck.config)
        # the prompt's first window goes to memory, its tail stays local and fills the window
        # during decode: the eviction step is among the compared tokens
        pieces = fot.pieces(len(ids))
        assert pieces[0] == (0, fot.window, True)
        assert pieces[-1][1] + NEW > fot.window
        want = Engine(ck.config, ck.params).generate(
            [ids], NEW, SamplingConfig(), eos_ids=ck.generation_config["eos_token_ids"]).row(0)
        out, err = cli.communicate(timeout=120)
    finally:
        cli.kill()
    assert cli.returncode == 0, err
    assert len(want) == NEW  # no early stop
    assert json.loads(out)["token_ids"] == want
