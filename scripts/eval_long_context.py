"""Length generalization of the embedded SmolLM2-135M-Instruct (trained to 8K): dense vs lambda
(vs FoT memory layers).

    python scripts/eval_long_context.py --out runs/long_context
    python scripts/eval_long_context.py --out runs/lc_fot --fot-checkpoint DIR \
        --ppl-models= --passkey-models fot,fot-base --lengths 4096,8192,16384,32768

(a) Perplexity of a long natural-language text, the Python Language Reference that ships with
    CPython (`pydoc_data.topics`, nothing downloaded), for dense, all-lambda and a dense/lambda
    hybrid. One causal forward over the longest length gives every shorter length exactly (token i
    sees only tokens <= i): ppl@N is the mean NLL over the first N tokens, and the plot shows the
    perplexity of consecutive 1K-token bins, where a blow-up past the training length is visible.
(b) Passkey retrieval: a 5-digit number hidden at a given depth of repetitive filler text, asked for
    at the end, answered greedily; accuracy per (depth, length) cell. Trials of one cell share the
    filler before the needle, so that prefix is computed once and its cache reused.

Everything runs through the model's cache in chunks (`--chunk` tokens), so memory stays bounded:
dense layers hold the whole context, lambda layers G + L entries, FoT layers their local window
(memory layers also their memory of everything before it). `--fot-checkpoint` names a FoT
checkpoint made from this model (e.g. the final export of configs/recipes/fot-smollm2-cpu.yaml):
**fot** is that checkpoint, **fot-base** the embedded model with the same FoT layers and no
fine-tune. Their local window is the checkpoint's `max_position_embeddings`: a passkey further
back than that is reachable only through the memory layers (`--min-distance` skips cells where
it is not). Writes `ppl.png`,
`passkey.png`, `results.md` and `results.json` under `--out` (written to a temporary directory
first and moved into place at the end, so an interrupted run leaves nothing half-written).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.checkpoint import CheckpointError, load_checkpoint
from jaxllama.checkpoint.base import relayout, with_overrides
from jaxllama.config import ConfigError
from jaxllama.inference.engine import prefill_chunk_for
from jaxllama.mixers.fot_attention import mem_layers_of
from jaxllama.model import Transformer, init_cache

TRAINED = 8192
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


def natural_text() -> str:
    """The Python Language Reference (CPython's `pydoc_data.topics`), topics in sorted order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


class Runner:
    """Chunked prefill / NLL / greedy decode of one model configuration (batch 1).

    `feed` cuts a prompt the way the engine does (`prefill_chunk_for`): in `chunk` pieces, unless
    a kind asks for its own chunk (FoT: the whole prompt, which it windows itself as the
    reference does; a FoT prompt fed in pieces is windowed differently). Perplexity keeps `chunk`
    (one call over the whole text would hold its [T V] logits)."""

    def __init__(self, cfg, params, chunk: int):
        self.cfg, self.params, self.chunk = cfg, params, chunk
        model = Transformer(cfg)

        def chunk_nll(params, tokens, targets, positions, cache):
            h, cache = model.apply({"params": params}, tokens, positions, cache,
                                   method=Transformer.hidden)
            logits = model.apply({"params": params}, h, method=Transformer.logits)  # [1 C V]
            logp = jax.nn.log_softmax(logits[0], axis=-1)
            nll = -jnp.take_along_axis(logp, targets[0][:, None], axis=-1)[:, 0]
            return nll, logits[0, -1], cache

        def chunk_last(params, tokens, positions, cache):
            # passkey prompts need only the last position's logits: skip the [C V] LM head
            h, cache = model.apply({"params": params}, tokens, positions, cache,
                                   method=Transformer.hidden)
            logits = model.apply({"params": params}, h[:, -1:], method=Transformer.logits)
            return logits[0, -1], cache

        def step(params, tokens, positions, cache):
            logits, cache = model.apply({"params": params}, tokens, positions, cache)
            return logits[0, -1], cache

        self._chunk = jax.jit(chunk_nll)
        self._chunk_last = jax.jit(chunk_last)
        self._step = jax.jit(step)

    def new_cache(self, max_len: int):
        return init_cache(self.cfg, 1, max_len)

    def run(self, ids: np.ndarray, start: int, cache):
        """Feed ids at positions start.. in chunks (the last one may be shorter: each distinct
        size compiles once); returns (NLL of each next token within ids [len-1], last logits,
        cache)."""
        nlls, last = [], None
        for a in range(0, len(ids), self.chunk):
            tok = ids[a:a + self.chunk]
            tgt = np.append(ids[a + 1:a + len(tok) + 1], 0)[:len(tok)]
            pos = np.arange(start + a, start + a + len(tok))
            nll, last, cache = self._chunk(self.params, jnp.asarray(tok[None]),
                                           jnp.asarray(tgt[None]), jnp.asarray(pos[None]), cache)
            nlls.append(np.asarray(nll))
        return np.concatenate(nlls)[:-1], last, cache

    def chunk_for(self, n: int) -> int:
        """Prefill chunk for an n-token prompt: `chunk`, or what the model's kinds ask for."""
        return prefill_chunk_for(self.cfg, n, self.chunk)

    def feed(self, ids: np.ndarray, start: int, cache):
        """Like `run` without the NLL, in `chunk_for(len(ids))` pieces: (last logits, cache)."""
        last = None
        step = self.chunk_for(len(ids))
        for a in range(0, len(ids), step):
            tok = ids[a:a + step]
            pos = np.arange(start + a, start + a + len(tok))
            last, cache = self._chunk_last(self.params, jnp.asarray(tok[None]),
                                           jnp.asarray(pos[None]), cache)
        return last, cache

    def greedy(self, last_logits, cache, position: int, n: int) -> list[int]:
        out = [int(jnp.argmax(last_logits))]
        for i in range(n - 1):
            logits, cache = self._step(self.params, jnp.array([[out[-1]]], jnp.int32),
                                       jnp.array([[position + i]], jnp.int32), cache)
            out.append(int(jnp.argmax(logits)))
        return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def cpu_minutes() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) / 60


def perplexity(runner: Runner, ids: np.ndarray, lengths: list[int], bin_size: int) -> dict:
    t0 = time.perf_counter()
    cache = runner.new_cache(len(ids))
    nll, _, _ = runner.run(ids, 0, cache)
    out = {f"ppl@{n}": float(np.exp(nll[:n - 1].mean())) for n in lengths}
    bins = [nll[a:a + bin_size].mean() for a in range(0, len(nll), bin_size)]
    out["bin_ppl"] = np.exp(bins).tolist()  # bin k: predictions of tokens k*bin+1 .. (k+1)*bin
    out["seconds"] = time.perf_counter() - t0
    return out


def passkey_prompt(tok, n_tokens: int, depth_tokens: int, key: int):
    """Token ids of exactly n_tokens: intro + filler, the needle starting at `depth_tokens`,
    filler, then the question. Returns (prefix ids, rest ids): the prefix does not depend on key."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    intro, filler = enc(INTRO), enc(FILLER)
    needle = enc(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    question = enc(QUESTION)
    reps = n_tokens // len(filler) + 2
    before = (intro + filler * reps)[:depth_tokens]
    after_len = n_tokens - depth_tokens - len(needle) - len(question)
    if after_len < 0:
        raise ValueError(f"passkey prompt of {n_tokens} tokens cannot hold the needle at "
                         f"{depth_tokens}")
    after = (filler * reps)[:after_len]
    return np.asarray(before, np.int32), np.asarray(needle + after + question, np.int32)


def needle_distance(tok, n_tokens: int, depth_tokens: int) -> int:
    """Tokens from the end of the needle to the end of the prompt (where the answer starts)."""
    _, rest = passkey_prompt(tok, n_tokens, depth_tokens, 10000)
    needle = tok.encode("The pass key is 10000. Remember it. 10000 is the pass key.\n",
                        add_special_tokens=False)
    return len(rest) - len(needle)


def passkey(runner: Runner, tok, lengths, depths, trials: dict, align: int, seed: int,
            out: dict, save, min_distance: int = 0) -> dict:
    """Accuracy per (length, depth) cell into `out` (cells already there are kept);
    `trials[length]` trials per cell (0 skips); `save()` after every cell. Cells whose needle
    ends fewer than `min_distance` tokens before the answer are skipped (not recorded)."""
    rng = np.random.default_rng(seed)
    for n in lengths:
        k = trials.get(n, 0)
        for d in depths if k else ():
            if f"{n}/{d}" in out:
                continue
            t0 = time.perf_counter()
            # shared prefix: whole align blocks, leaving room for the needle and the question
            depth_tokens = min(round(d * n / align), (n - 64) // align) * align
            if needle_distance(tok, n, depth_tokens) < min_distance:
                print(f"  passkey length {n} depth {d}: skipped (needle within "
                      f"{min_distance} tokens of the question)", flush=True)
                continue
            prefix, _ = passkey_prompt(tok, n, depth_tokens, 0)
            # the key-free prefix is fed once and shared by the trials only where the runner's
            # own chunking applies: a kind that asks for its own chunk gets each prompt its way
            shared = len(prefix) if runner.chunk_for(n) == runner.chunk else 0
            cache0 = runner.new_cache(n + 16)
            if shared:
                _, cache0 = runner.feed(prefix, 0, cache0)
            hits = []
            for _ in range(k):
                key = int(rng.integers(10000, 100000))
                prefix, rest = passkey_prompt(tok, n, depth_tokens, key)
                ids = rest if shared else np.concatenate([prefix, rest])
                last, cache = runner.feed(ids, shared, cache0)
                answer = tok.decode(runner.greedy(last, cache, n, 8))
                digits = "".join(ch if ch.isdigit() else " " for ch in answer).split()
                hits.append(bool(digits) and digits[0] == str(key))
            out[f"{n}/{d}"] = {"length": n, "depth": d, "trials": k, "correct": int(sum(hits)),
                               "peak_rss_gb": peak_rss_gb(),
                                   "seconds": time.perf_counter() - t0}
            print(f"  passkey length {n} depth {d}: {sum(hits)}/{k} ({time.perf_counter() - t0:.0f}"
                  f" s, {cpu_minutes():.0f} CPU-min so far, peak RSS {peak_rss_gb():.1f} GB)",
                  flush=True)
            save()
    return out


class Partial:
    """Results kept in a JSON file across invocations (`--partial`): finished perplexity runs and
    passkey cells are skipped when the script runs again, so a long evaluation can be split."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.data = {"perplexity": {}, "passkey": {}, "runs": []}
        if self.path and self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        if self.path:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- reporting

def plot_ppl(results: dict, bin_size: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        x = (np.arange(len(r["bin_ppl"])) + 1) * bin_size
        ax.plot(x, r["bin_ppl"], marker=".", label=name)
    ax.axvline(TRAINED, color="gray", ls="--", lw=1)
    ax.text(TRAINED, ax.get_ylim()[1], " trained length", va="top", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"perplexity of each {bin_size}-token bin")
    ax.set_title("SmolLM2-135M-Instruct on the Python Language Reference")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(results: dict, lengths, depths, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5), squeeze=False)
    for ax, (name, cells) in zip(axes[0], results.items()):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                c = cells.get(f"{n}/{d}")
                if c:
                    grid[i, j] = c["correct"] / c["trials"]
                ax.text(j, i, f"{c['correct']}/{c['trials']}" if c else "not run", ha="center",
                        va="center", fontsize=9 if c else 7, color="black" if c else "gray")
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(meta: dict, ppl: dict, keys: dict, lengths, depths) -> str:
    lines = [f"Command: `{meta['command']}`", "",
             (f"Machine: {meta['machine']}; date {meta['date']}; wall time "
             f"{meta['seconds'] / 60:.0f} min ({meta['cpu_minutes']:.0f} CPU-minutes); peak RSS "
             f"{meta['peak_rss_gb']:.1f} GB."), "",
             f"Models: {'; '.join(f'**{k}**: {v}' for k, v in meta['models'].items())}.", ""]
    if ppl:
        lines += [("Perplexity of the first N tokens (Python Language Reference, "
                  "`pydoc_data.topics`):"), "",
                  "| model | " + " | ".join(f"{n // 1024}K" for n in lengths)
                  + " | seconds | peak RSS |",
                  "|---|" + "---:|" * (len(lengths) + 2)]
        for name, r in ppl.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[f'ppl@{n}']:.2f}" for n in lengths)
                         + f" | {r['seconds']:.0f} | {r.get('peak_rss_gb', 0):.1f} GB |")
        lines.append("")
    if keys:
        lines += ["Passkey retrieval (correct/trials; needle depth as a fraction of the context):",
                  "", "| model | depth | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
                  "|---|---:|" + "---:|" * len(lengths)]
        for name, cells in keys.items():
            for d in depths:
                row = []
                for n in lengths:
                    c = cells.get(f"{n}/{d}")
                    row.append(f"{c['correct']}/{c['trials']}" if c else "not run")
                lines.append(f"| {name} | {d:.0%} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}"
                                         ) from None
    if any(not 0 <= x <= 1 for x in out):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return out


def _trials(text: str) -> dict[int, int]:
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(n): int(k) for n, k in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LENGTH:TRIALS pairs, e.g. 2048:10,32768:2, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


FOT_MODELS = ("fot", "fot-base")


def fot_models(ck, path: str) -> dict:
    """**fot** (the checkpoint at `path`, for inference: no cross-batch) and **fot-base** (the
    embedded model's weights in the same layer layout, untuned)."""
    import dataclasses

    fot = load_checkpoint(path, "float32")
    cfg = fot.config
    if cfg.fot is None or cfg.num_layers != ck.config.num_layers:
        raise ValueError(f"--fot-checkpoint {path}: not a FoT model of the embedded model's "
                         f"{ck.config.num_layers} layers")
    cfg = cfg.replace(fot=dataclasses.replace(cfg.fot, cross_batch_range=0))
    mem = mem_layers_of(cfg)
    desc = (f"memory layers {','.join(map(str, mem))}, local window "
            f"{cfg.max_position_embeddings}")
    return {"fot": (cfg, fot.params, f"{desc}, fine-tuned ({path})"),
            "fot-base": (cfg, relayout(ck.params, ck.config, cfg), f"{desc}, no fine-tune")}


def build_models(ck, args, names=()) -> dict:
    lam = [f"model.lambda.global_tokens={args.global_tokens}",
           f"model.lambda.window={args.window}", f"model.lambda.distance={args.window}"]
    dense_list = ",".join(str(i) for i in args.hybrid_dense)
    patterns = {"dense": None, "lambda": "lambda",
                "hybrid": f"{{default: lambda, dense: [{dense_list}]}}"}
    models = {}
    if args.fot_checkpoint and set(names) & set(FOT_MODELS):
        models.update(fot_models(ck, args.fot_checkpoint))
    for name, pattern in patterns.items():
        if pattern is None:
            models[name] = (ck.config, ck.params, "all 30 layers dense")
            continue
        cfg = with_overrides(ck.config, [f"model.layer_pattern={pattern}"] + lam)
        desc = (f"G={args.global_tokens}, L=D={args.window}" if name == "lambda" else
                f"dense layers {dense_list}, lambda elsewhere")
        models[name] = (cfg, relayout(ck.params, ck.config, cfg), desc)
    return models


def main(argv=None) -> int:
    ap = _Parser(prog="scripts/eval_long_context.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/long_context", help="output directory")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--lengths", type=_ints, default=[2048, 8192, 16384, 32768])
    ap.add_argument("--ppl-models", default="lambda,hybrid,dense")
    ap.add_argument("--passkey-models", default="lambda,dense")
    ap.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9])
    ap.add_argument("--trials", type=_trials, default={2048: 10, 8192: 10, 16384: 10, 32768: 10},
                    help="passkey trials per cell for each length, e.g. 2048:10,32768:2")
    ap.add_argument("--dense-trials", type=_trials, default=None,
                    help="passkey trials of the dense model (default: --trials)")
    ap.add_argument("--window", type=int, default=2048, help="lambda window L (= distance D)")
    ap.add_argument("--global-tokens", type=int, default=100, help="lambda sink tokens G")
    ap.add_argument("--hybrid-dense", type=_ints, default=[0, 8, 16, 24],
                    help="dense layers of the hybrid (the others are lambda)")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    ap.add_argument("--bin", type=int, default=1024, help="perplexity plot bin (tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fot-checkpoint", default=None,
                    help="FoT checkpoint of this model: adds the models fot and fot-base")
    ap.add_argument("--min-distance", type=int, default=0,
                    help="skip passkey cells whose needle is fewer tokens before the question")
    ap.add_argument("--partial", default=None,
                    help="JSON file of finished parts: updated as the run goes, skipped on rerun")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing: write the plots and tables from --partial (cells not "
                         "in it show as not run)")
    args = ap.parse_args(argv)
    if args.report_only and not (args.partial and Path(args.partial).is_file()):
        ap.error("--report-only needs --partial naming an existing results file")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        ap.error(f"--out {out} exists (pass --overwrite to replace it)")
    if args.chunk <= 0 or args.chunk % 256:
        ap.error(f"--chunk must be a positive multiple of 256, got {args.chunk}")
    known = ("dense", "lambda", "hybrid") + FOT_MODELS
    ppl_models = [m for m in args.ppl_models.split(",") if m]
    key_models = [m for m in args.passkey_models.split(",") if m]
    for m in ppl_models + key_models:
        if m not in known:
            ap.error(f"unknown model {m!r} (known: {', '.join(known)})")
        if m in FOT_MODELS and not args.fot_checkpoint:
            ap.error(f"model {m} needs --fot-checkpoint")
    lengths = sorted(args.lengths)

    t_start = time.perf_counter()
    ck = load_checkpoint(None)
    try:
        models = build_models(ck, args, ppl_models + key_models)
    except (ValueError, OSError, CheckpointError, ConfigError) as e:
        ap.error(str(e).splitlines()[0])
    if not args.report_only:
        text_ids = np.asarray(ck.tokenizer.encode(natural_text(), add_special_tokens=False),
                              np.int32)
        if len(text_ids) < lengths[-1]:
            ap.error(f"the text has only {len(text_ids)} tokens, fewer than {lengths[-1]}")
    state = Partial(args.partial)
    ppl, keys = state.data["perplexity"], state.data["passkey"]
    if args.report_only:
        ppl = {k: v for k, v in ppl.items() if k in ppl_models}
        keys = {k: v for k, v in keys.items() if k in key_models}
    for name in () if args.report_only else dict.fromkeys(ppl_models + key_models):
        # lambda first: its peak RSS is its own
        cfg, params, _ = models[name]
        runner = Runner(cfg, params, args.chunk)
        if name in ppl_models and name not in ppl:
            ppl[name] = perplexity(runner, text_ids[:lengths[-1]], lengths, args.bin)
            ppl[name]["peak_rss_gb"] = peak_rss_gb()
            state.save()
            print(f"{name}: " + ", ".join(f"ppl@{n} {ppl[name][f'ppl@{n}']:.2f}" for n in lengths)
                  + f" ({ppl[name]['seconds']:.0f} s, {cpu_minutes():.0f} CPU-min so far, peak RSS"
                  f" {peak_rss_gb():.1f} GB)", flush=True)
        if name in key_models:
            trials = args.dense_trials if name == "dense" and args.dense_trials else args.trials
            passkey(runner, ck.tokenizer, lengths, args.depths, trials, 256, args.seed,
                    keys.setdefault(name, {}), state.save, args.min_distance)

    if not args.report_only:
        command = "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))
        state.data["runs"].append({"command": command, "cpu_minutes": cpu_minutes(),
                                   "seconds": time.perf_counter() - t_start,
                                   "date": time.strftime("%Y-%m-%d")})
        state.save()
    runs = state.data["runs"]
    recorded = ([r.get("peak_rss_gb", 0.0) for r in ppl.values()]
                + [c.get("peak_rss_gb", 0.0) for cells in keys.values() for c in cells.values()])
    meta = {"command": " && ".join(r["command"] for r in runs),
                "machine": f"{os.cpu_count()} CPU cores, JAX {jax.__version__} "
                        f"({jax.default_backend()}), float32",
                "date": time.strftime("%Y-%m-%d"), "seconds": sum(r["seconds"] for r in runs),
                "cpu_minutes": sum(r["cpu_minutes"] for r in runs),
                "peak_rss_gb": max([peak_rss_gb()] + recorded),
                "models": {k: v[2] for k, v in models.items() if k in ppl_models + key_models}}
    tmp = Path(tempfile.mkdtemp(prefix=".eval_long_context.", dir=out.parent if out.parent.exists()
                                else None))
    try:
        if ppl:
            plot_ppl(ppl, args.bin, tmp / "ppl.png")
        if keys:
            plot_passkey(keys, lengths, args.depths, tmp / "passkey.png")
        (tmp / "results.md").write_text(markdown(meta, ppl, keys, lengths, args.depths))
        (tmp / "results.json").write_text(json.dumps({"meta": meta, "perplexity": ppl,
                                                          "passkey": keys}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(out))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
