"""Where SmolLM2's 2048-token prefill spends its time on a CPU, and what XLA:CPU's products reach.

    python scripts/bench_cpu_prefill.py

1. Matrix products [2048 576] x [576 1536] (a prefill projection): float32, bfloat16 in and out,
   bfloat16 in with float32 accumulation (what `Linear` does); GFLOP/s.
2. Matrix-vector product [1 576] x [576 49152] (the decode LM head): float32 vs bfloat16, GB/s read.
3. One layer's causal attention, T = 2048, 9 query / 3 kv heads of 64, bfloat16: ours (blockwise
   reference, what the model runs on CPU) at several block sizes vs `jax.nn.dot_product_attention`
   (XLA), with the ratio.
4. The whole model's 2048-token forward (final hidden states, no LM head): bfloat16 compute without
   a cache, through a float32 and a bfloat16 KV cache, and float32 compute; tokens/s.
Best of `--repeats` after a warm-up.

Sections for the CPU speed-ups (issue 15), chosen with `--only NAME[,NAME]`; each alternates its
variants (A B A B ...) inside one process, so a loaded machine slows both alike, and prints the
time ratio of every round:
  - `attention`: one layer's causal attention in float32 (9 query / 3 kv heads of 64) at T = 512,
    1024, 2048, 4096, blockwise (`xla`) against masked products (`xla_masked`), both without a
    cache (static offsets) and as the engine's cached prefill runs it (T queries over T + 128
    slots at a traced offset), plus a one-token decode over 2176 slots;
  - `matvecs`: the float32 matrix-vector products of a SmolLM2 decode step, separate q/k/v and
    gate/up against fused, GB/s read (run under different XLA_FLAGS to compare flags);
  - `products`: section 1 alone (for comparing XLA_FLAGS);
  - `hlo`: op counts of SmolLM2's compiled decode loop, separate against fused kernels;
  - `decode`: SmolLM2 float32 greedy decode through the engine with the fused decode copy against
    the separate kernels (`Engine(fused=...)`), tokens/s;
  - `floor`: the decode step's weight products alone (all 30 layers' fused float32 kernels and
    the LM head, streamed from memory) against the engine's whole float32 decode step.
The default (no `--only`) runs sections 1-4 above.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxllama.kernels.flash_attention.api import attend
from jaxllama.kernels.flash_attention.mask import Mask


def best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out = min(out, time.perf_counter() - t0)
    return out


def products(repeats: int) -> None:
    m, k, n = 2048, 576, 1536
    flops = 2 * m * k * n
    rates = {}
    for name, dt, acc in [("float32", jnp.float32, None),
                          ("bfloat16 -> bfloat16", jnp.bfloat16, None),
                          ("bfloat16, float32 accumulation", jnp.bfloat16, jnp.float32)]:
        x, w = jnp.ones((m, k), dt), jnp.ones((k, n), dt)
        fn = jax.jit(lambda x, w, acc=acc: jnp.dot(x, w, preferred_element_type=acc))
        rates[name] = flops / best_seconds(fn, x, w, repeats=repeats) / 1e9
        print(f"| matmul [{m} {k}] x [{k} {n}] | {name} | {rates[name]:.0f} GFLOP/s |")
    print(f"bfloat16 with float32 accumulation / float32 = "
          f"{rates['bfloat16, float32 accumulation'] / rates['float32']:.2f}")
    read = {}
    for name, dt in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
        x, w = jnp.ones((1, k), dt), jnp.ones((k, 49152), dt)
        s = best_seconds(jax.jit(jnp.dot), x, w, repeats=repeats)
        read[name] = w.size * w.dtype.itemsize / s / 1e9
        print(f"| matvec [1 {k}] x [{k} 49152] | {name} | {read[name]:.1f} GB/s |")
    print(f"float32 / bfloat16 matvec read rate = {read['float32'] / read['bfloat16']:.1f}")


def attention(repeats: int) -> None:
    t, n, kv, h = 2048, 9, 3, 64
    q = jax.random.normal(jax.random.key(0), (1, t, n, h), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (1, t, kv, h), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (1, t, kv, h), jnp.bfloat16)
    visible_flops = 4 * h * n * t * (t + 1) / 2
    ours = {}
    for bs in [None, (128, 128), (256, 256), (512, 512), (2048, 2048)]:
        fn = jax.jit(lambda q, k, v, bs=bs: attend(q, k, v, Mask(causal=True), block_sizes=bs,
                                                   implementation="xla"))
        ours[bs] = best_seconds(fn, q, k, v, repeats=repeats)
        print(f"| attention T {t}, ours, blocks {bs or 'default'} | {ours[bs] * 1e3:.1f} ms | "
              f"{visible_flops / ours[bs] / 1e9:.0f} GFLOP/s visible |")
    g = n // kv
    peer = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), is_causal=True,
        implementation="xla"))
    s = best_seconds(peer, q, k, v, repeats=repeats)
    print(f"| attention T {t}, jax.nn.dot_product_attention (xla) | {s * 1e3:.1f} ms | |")
    print(f"ours (default blocks) / jax.nn time = {ours[None] / s:.2f}; x30 layers: "
          f"{ours[None] * 30:.2f} s per 2048-token prefill")


def model_forward(repeats: int) -> None:
    from jaxllama.api import from_pretrained
    from jaxllama.model import Transformer, init_cache

    llm = from_pretrained(None, "bfloat16")
    ids = jnp.asarray(np.random.default_rng(0).integers(100, 40000, (1, 2048)), jnp.int32)
    pos = jnp.arange(2048, dtype=jnp.int32)[None]
    for compute, cache_dtype in [("bfloat16", None), ("bfloat16", jnp.float32),
                                 ("bfloat16", jnp.bfloat16), ("float32", None)]:
        model = Transformer(llm.config.replace(dtype=compute))
        if cache_dtype is None:
            fn = jax.jit(lambda p, t, q, m=model: m.apply({"params": p}, t, q,
                                                          method=Transformer.hidden)[0])
            args = (llm.params, ids, pos)
        else:
            cache = init_cache(model.cfg, 1, 2048 + 128, dtype=cache_dtype)
            fn = jax.jit(lambda p, t, q, c, m=model: m.apply(
                {"params": p}, t, q, c, jnp.ones_like(t), method=Transformer.hidden)[0])
            args = (llm.params, ids, pos, cache)
        s = best_seconds(fn, *args, repeats=repeats)
        where = "no cache" if cache_dtype is None else f"{jnp.dtype(cache_dtype).name} cache"
        print(f"| SmolLM2 forward, 2048 tokens | {compute} compute, {where} | "
              f"{2048 / s:.0f} tok/s ({s:.2f} s) |", flush=True)


def alternate(variants: dict, rounds: int) -> dict:
    """Time each of `variants` (name -> zero-argument function returning seconds) once per round,
    in turn, after one warm-up each; the best per variant and the per-round times."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(fn())
    return times


def _timer(fn, *args):
    def once():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0
    return once


def _ratios(times: dict, a: str, b: str) -> str:
    return " ".join(f"{x / y:.2f}" for x, y in zip(times[a], times[b], strict=True))


def attention_lengths(repeats: int, lengths=(512, 1024, 2048, 4096)) -> None:
    n, kv, h = 9, 3, 64
    print("| T | form | xla ms (best) | xla_masked ms (best) | masked / xla per round |")
    print("|---:|---|---:|---:|---|")
    for t in lengths:
        for form in ("no cache", "cached prefill"):
            s = t if form == "no cache" else t + 128
            q, k, v = (jax.random.normal(jax.random.key(i), (1, m, heads, h), jnp.float32)
                       for i, (m, heads) in enumerate([(t, n), (s, kv), (s, kv)]))
            off = jnp.int32(0)
            seg_q, seg_k = jnp.ones((1, t), jnp.int32), (jnp.arange(s) < t)[None].astype(jnp.int32)

            def make(impl, form=form):
                if form == "no cache":
                    return jax.jit(lambda a, b, c, o, sq, sk: attend(
                        a, b, c, Mask(causal=True), implementation=impl))
                return jax.jit(lambda a, b, c, o, sq, sk: attend(a, b, c, Mask(
                    causal=True, q_offset=o, q_segment_ids=sq, kv_segment_ids=sk),
                    implementation=impl))

            times = alternate({impl: _timer(make(impl), q, k, v, off, seg_q, seg_k)
                               for impl in ("xla", "xla_masked")}, repeats)
            print(f"| {t} | {form} | {min(times['xla']) * 1e3:.1f} | "
                  f"{min(times['xla_masked']) * 1e3:.1f} | "
                  f"{_ratios(times, 'xla_masked', 'xla')} |", flush=True)
    s = 2176
    q = jax.random.normal(jax.random.key(0), (1, 1, n, h), jnp.float32)
    k = jax.random.normal(jax.random.key(1), (1, s, kv, h), jnp.float32)
    seg_k = (jnp.arange(s) < 2100)[None].astype(jnp.int32)
    fns = {impl: jax.jit(lambda q, k, o, impl=impl: attend(q, k, k, Mask(
        causal=True, q_offset=o, q_segment_ids=jnp.ones((1, 1), jnp.int32),
        kv_segment_ids=seg_k), implementation=impl)) for impl in ("xla", "xla_masked")}
    times = alternate({i: _timer(f, q, k, jnp.int32(2099)) for i, f in fns.items()}, 5 * repeats)
    print(f"| 1 (decode) | over {s} slots | {min(times['xla']) * 1e3:.3f} | "
          f"{min(times['xla_masked']) * 1e3:.3f} | {_ratios(times, 'xla_masked', 'xla')} |")


def matvecs(repeats: int) -> None:
    """SmolLM2's per-layer decode products, float32, separate against fused; GB/s read."""
    d, f, nq, nkv = 576, 1536, 576, 192
    groups = {"q, k, v separate": [(d, nq), (d, nkv), (d, nkv)], "qkv fused": [(d, nq + 2 * nkv)],
              "gate, up separate": [(d, f), (d, f)], "gate_up fused": [(d, 2 * f)],
              "down": [(f, d)], "LM head": [(d, 49152)]}
    x = {n: jnp.ones((1, n), jnp.float32) for n in (d, f)}
    variants, nbytes = {}, {}
    for name, shapes in groups.items():
        ws = [jax.random.normal(jax.random.key(i), sh, jnp.float32) for i, sh in enumerate(shapes)]
        fn = jax.jit(lambda ws, x: [x @ w for w in ws])
        arg = x[shapes[0][0]]
        n_calls = 20 if name != "LM head" else 5

        def once(fn=fn, ws=ws, arg=arg, n_calls=n_calls):  # one jitted group per call, as decode
            t0 = time.perf_counter()
            for _ in range(n_calls):
                out = fn(ws, arg)
            jax.block_until_ready(out)
            return (time.perf_counter() - t0) / n_calls
        variants[name], nbytes[name] = once, sum(w.nbytes for w in ws)
    times = alternate(variants, repeats)
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for name in groups:
        print(f"| matvec {name} | {min(times[name]) * 1e6:.0f} us | "
              f"{nbytes[name] / min(times[name]) / 1e9:.1f} GB/s |", flush=True)


def fused_decode(repeats: int, new: int = 64) -> None:
    """SmolLM2 float32 greedy decode, fused decode copy against separate kernels."""
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.inference import Engine

    ck = load_checkpoint(None, "float32")
    prompt = list(range(100, 142))
    engines = {f: Engine(ck.config, ck.params, fused=f) for f in (False, True)}
    outs = {f: e.generate([prompt], max_new_tokens=new).tokens for f, e in engines.items()}
    same = np.array_equal(outs[False], outs[True])

    def run(e):
        return lambda: e.generate([prompt], max_new_tokens=new).decode_seconds / (new - 1)
    times = alternate({f: run(e) for f, e in engines.items()}, repeats)
    print(f"| SmolLM2 float32 decode, {new} tokens | separate {1 / min(times[False]):.1f} tok/s |"
          f" fused {1 / min(times[True]):.1f} tok/s | fused / separate time per round "
          f"{_ratios(times, True, False)} | same tokens: {same} |", flush=True)


def decode_hlo(repeats: int) -> None:
    """Op counts of SmolLM2's compiled float32 decode loop (the engine's `chunk` program) with
    the separate kernels and with the fused decode copy: what each token dispatches."""
    import collections
    import re

    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.inference import Engine

    del repeats
    ck = load_checkpoint(None, "float32")
    for fused in (False, True):
        engine = Engine(ck.config, ck.params, fused=fused)
        engine.generate([list(range(100, 142))], max_new_tokens=2)
        (text,) = [c.as_text() for key, c in engine._compiled.items() if key[0] == "chunk"]
        # instructions outside fused computations: what the CPU runtime dispatches
        comps = [c for c in re.split(r"\n\n", text) if "fused_computation" not in
                 c.split("\n", 1)[0] and not c.lstrip().startswith("%fused")]
        ops = collections.Counter(op for c in comps for op in re.findall(
            r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9-]*)\(", c, re.MULTILINE))
        keep = ("dot", "fusion", "copy", "while", "dynamic-update-slice", "custom-call")
        print(f"| decode loop, {'fused' if fused else 'separate'} | "
              + ", ".join(f"{op} {ops.get(op, 0)}" for op in keep)
              + f" | {sum(ops.values())} instructions |", flush=True)


def product_floor(repeats: int, new: int = 64) -> None:
    """The decode step's weight products alone against the whole step: SmolLM2's 30 layers of
    fused float32 decode kernels (qkv, o, gate_up, down) and the LM head chained in one jitted
    call with nothing else (random weights of those shapes, 538 MB streamed per token, so the
    products run at DRAM bandwidth as in decode, not from cache as `matvecs` measures them),
    alternated with the engine's float32 greedy decode; what the step spends beyond its
    products is the difference."""
    from jaxllama.checkpoint import load_checkpoint
    from jaxllama.inference import Engine

    ck = load_checkpoint(None, "float32")
    c = ck.config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    hd = c.attention.head_dim_for(d)
    nq, nkv = c.attention.num_heads * hd, c.attention.num_kv_heads * hd
    keys = iter(jax.random.split(jax.random.key(0), 4 * c.num_layers + 1))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32) * 0.02
    layers = [{"qkv": normal((d, nq + 2 * nkv)), "o": normal((nq, d)),
               "gate_up": normal((d, 2 * f)), "down": normal((f, d))}
              for _ in range(c.num_layers)]
    head = normal((d, v))
    nbytes = sum(a.nbytes for a in jax.tree.leaves(layers)) + head.nbytes

    @jax.jit
    def products_only(x, layers, head):
        h = x
        for w in layers:
            h = h + (h @ w["qkv"])[:, :nq] @ w["o"]
            g = h @ w["gate_up"]
            h = h + (jax.nn.silu(g[:, :f]) * g[:, f:]) @ w["down"]
        return jnp.argmax(h @ head, axis=-1)

    x = jnp.ones((1, d), jnp.float32)
    products_only(x, layers, head).block_until_ready()

    def floor():
        t0 = time.perf_counter()
        for _ in range(new):
            out = products_only(x, layers, head)
        out.block_until_ready()
        return (time.perf_counter() - t0) / new

    engine = Engine(c, ck.params)
    prompt = list(range(100, 142))
    engine.generate([prompt], max_new_tokens=new)
    step = lambda: engine.generate([prompt], max_new_tokens=new).decode_seconds / (new - 1)
    times = alternate({"floor": floor, "step": step}, repeats)
    fl, st = min(times["floor"]), min(times["step"])
    print(f"| decode products only ({nbytes / 1e6:.0f} MB float32) | {fl * 1e3:.2f} ms/token | "
          f"{nbytes / fl / 1e9:.1f} GB/s | {1 / fl:.1f} tok/s |")
    print(f"| engine float32 decode step | {st * 1e3:.2f} ms/token | products {fl / st:.0%} of "
          f"the step, the rest {(st - fl) * 1e3:.2f} ms | {1 / st:.1f} tok/s |", flush=True)


SECTIONS = {"hlo": decode_hlo, "attention": attention_lengths, "matvecs": matvecs,
            "decode": fused_decode, "products": products, "floor": product_floor}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="scripts/bench_cpu_prefill.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help=f"comma-separated sections of {sorted(SECTIONS)}")
    ap.add_argument("--lengths", default="512,1024,2048,4096",
                    help="attention section: comma-separated T")
    args = ap.parse_args(argv)
    if args.repeats <= 0:
        ap.error("--repeats must be > 0")
    only = [x for x in args.only.split(",") if x]
    bad = [x for x in only if x not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section {bad[0]!r} (sections: {', '.join(SECTIONS)})")
    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError:
        ap.error(f"--lengths: not comma-separated integers: {args.lengths!r}")
    if min(lengths) < 1:
        ap.error("--lengths must be >= 1")
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    if only:
        for name in only:
            if name == "attention":
                attention_lengths(args.repeats, lengths)
            else:
                SECTIONS[name](args.repeats)
        return 0
    products(args.repeats)
    attention(args.repeats)
    model_forward(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
