"""Mamba1's selective scan as Pallas kernels, forward and backward (`custom_vjp`), for both
backends: Triton (`pallas_gpu`, `pallas_interpret`) and Mosaic TPU (`pallas_tpu`).

What a program computes. Grid programs own (batch row, B/C group, block of `br` channels of that
group); the state block is [N, br] float32 (d_state on rows, channels on columns), kept on chip for
the whole sequence. Per step t, from rows u_t, delta_t [1, br], columns B_t, C_t [N, 1] and the
reset flag k_t [1, 1] (0 where the segment restarts, else 1):
    a_t = exp(delta_t A) k_t                    [N, br]
    h_t = a_t h_{t-1} + B_t (delta_t u_t)       [N, br]
    y_t = sum_n C_t[n] h_t[n]                   [1, br]
D u, the padding masks and the layout copies stay in XLA (the `reference` semantics).

Backward without storing every state: the forward writes the state entering each chunk of L steps
(`hs` [.., chunks, N, br], float32); the backward walks the chunks from the last to the first,
recomputes the chunk's L entering states from its checkpoint into a [L, N, br] workspace, then runs
the adjoint recurrence backwards through the chunk:
    g_t = lam + C_t dy_t          (dL/dh_t; lam = a_{t+1} g_{t+1}, starting at dL/d final)
    dB_t = sum_d g_t (delta_t u_t)         dC_t = sum_d h_t dy_t          (over this block's d)
    w_t = sum_n g_t B_t      du_t = w_t delta_t      ddelta_t = w_t u_t + sum_n g_t h_{t-1} a_t A
    dA += g_t h_{t-1} a_t delta_t          lam = a_t g_t
and the lam left after the first chunk is the initial state's gradient. Extra memory: S / L
checkpoints of [N, br] per program instead of S states.

Layout (XLA copies once per call): time is a leading, untiled axis of every tile, so a step reads
its row or column with one dynamic leading index on either backend (no dynamic lane slicing):
per-channel arrays are [B G S 1 R] (R = channels per group), B and C [B G S N 1], the reset flags
[B S 1 1], A [G N R], states [B G N R].

The two backends differ in how the sequence is walked:
  - Triton (grid (batch, group, channel block)): one program loops over all chunks itself (Triton
    programs cannot carry state across grid steps); its tiles are whole-sequence views of global
    memory, read a row at a time; the backward's workspace is a global-memory output (a block
    barrier between its writes and its reads). R and N are zero-padded to Triton's power-of-two
    tensor sizes (padded channels have A = 0 and no input: their state stays 0).
  - Mosaic TPU (grid (batch, group, channel block, chunk), the chunk axis sequential): the state
    (and in the backward the adjoint, dA and the workspace) live in VMEM scratch across the chunk
    steps, each chunk's tiles double-buffered by the pipeline; the backward's chunk index maps run
    backwards. A channel block is the whole group or a multiple of 128 lanes.
Kernel names: `jaxllama_selective_{fwd,bwd}_{gpu,tpu}`. Not run on hardware yet (no GPU or TPU in
the writing session); `test_ssm_scan` runs both in their interpreters and lowers both with
`jax.export`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxllama.kernels._common import F32, pad_to, round_up
from jaxllama.kernels.ssm_scan import reference


class Backend(NamedTuple):
    """suffix `gpu` | `tpu` (kernel names), compiler params, interpret flag (bool for Triton,
    `pltpu.InterpretParams` or None for Mosaic), channel block `br` for a group width (and the
    padded width it tiles), and whether N is padded to a power of two."""

    suffix: str
    params: Any
    interpret: Any
    block: Any  # r -> (br, padded r)
    pad_pow2: bool


def _pow2(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


# ----------------------------------------------------------------------------- per-step math


def _decay(d, A, k):
    return jnp.exp(d * A) * k  # [1 br] x [N br] x [1 1] -> [N br]


def _step_fwd(t, h, A, u_ref, d_ref, k_ref, b_ref, c_ref, y_ref):
    """State h [N br] after step t (rows of the refs at leading index t); writes y_t if y_ref."""
    u, d = u_ref[t], d_ref[t]  # [1 br]
    h = _decay(d, A, k_ref[t]) * h + b_ref[t] * (d * u)  # b [N 1]
    if y_ref is not None:
        y_ref[t] = jnp.sum(h * c_ref[t], axis=0, keepdims=True)
    return h


def _step_bwd(t, i, carry, A, ws_ref, ins, outs):
    """The adjoint step at sequence index t (workspace row i holds h_{t-1}); carry (lam, dA)."""
    lam, dA = carry
    u_ref, d_ref, k_ref, b_ref, c_ref, dy_ref = ins
    du_ref, dd_ref, db_ref, dc_ref = outs
    hp = ws_ref[i]
    u, d, bcol, ccol, dy = u_ref[t], d_ref[t], b_ref[t], c_ref[t], dy_ref[t]
    a = _decay(d, A, k_ref[t])
    du_in = d * u
    h = a * hp + bcol * du_in
    dc_ref[t] = jnp.sum(h * dy, axis=1, keepdims=True)  # [N 1]
    g = lam + ccol * dy
    db_ref[t] = jnp.sum(g * du_in, axis=1, keepdims=True)
    w = jnp.sum(g * bcol, axis=0, keepdims=True)  # [1 br]
    ga = g * hp * a
    du_ref[t] = w * d
    dd_ref[t] = w * u + jnp.sum(ga * A, axis=0, keepdims=True)
    return a * g, dA + ga * d


def _recompute(base, L, h, A, ins, ws_ref):
    """Writes the L states entering steps base .. base+L-1 into ws_ref (from h at base)."""
    u_ref, d_ref, k_ref, b_ref, c_ref, _ = ins

    def one(i, h):
        ws_ref[i] = h
        return _step_fwd(base + i, h, A, u_ref, d_ref, k_ref, b_ref, c_ref, None)

    lax.fori_loop(0, L, one, h)


def _reverse(base, L, carry, A, ws_ref, ins, outs):
    def one(j, carry):
        i = L - 1 - j
        return _step_bwd(base + i, i, carry, A, ws_ref, ins, outs)

    return lax.fori_loop(0, L, one, carry)


# ----------------------------------------------------------------------------- Triton kernels


def _fwd_loop_kernel(u_ref, d_ref, k_ref, a_ref, b_ref, c_ref, h0_ref, y_ref, hs_ref, fin_ref,
                     *, L, nc):
    A = a_ref[...]

    def chunk(ci, h):
        hs_ref[ci] = h
        step = lambda i, h: _step_fwd(ci * L + i, h, A, u_ref, d_ref, k_ref, b_ref, c_ref, y_ref)
        return lax.fori_loop(0, L, step, h)

    fin_ref[...] = lax.fori_loop(0, nc, chunk, h0_ref[...])


def _bwd_loop_kernel(u_ref, d_ref, k_ref, a_ref, b_ref, c_ref, hs_ref, dy_ref, dfin_ref,
                     du_ref, dd_ref, db_ref, dc_ref, da_ref, dh0_ref, ws_ref, *, L, nc,
                     barrier=False):
    """`barrier` (compiled, not interpreted): a thread-block barrier between writing the global
    workspace and reading it back, and before the next chunk overwrites it."""
    A = a_ref[...]
    ins = (u_ref, d_ref, k_ref, b_ref, c_ref, dy_ref)
    outs = (du_ref, dd_ref, db_ref, dc_ref)
    sync = pltriton.debug_barrier if barrier else (lambda: None)

    def chunk(j, carry):
        ci = nc - 1 - j
        _recompute(ci * L, L, hs_ref[ci], A, ins, ws_ref)
        sync()
        carry = _reverse(ci * L, L, carry, A, ws_ref, ins, outs)
        sync()
        return carry

    lam, dA = lax.fori_loop(0, nc, chunk, (dfin_ref[...], jnp.zeros_like(A)))
    dh0_ref[...] = lam
    da_ref[...] = dA


# ----------------------------------------------------------------------------- Mosaic kernels


def _fwd_grid_kernel(u_ref, d_ref, k_ref, a_ref, b_ref, c_ref, h0_ref, y_ref, hs_ref, fin_ref,
                     h_scr, *, L):
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        h_scr[...] = h0_ref[...]

    A = a_ref[...]
    h = h_scr[...]
    hs_ref[...] = h
    step = lambda i, h: _step_fwd(i, h, A, u_ref, d_ref, k_ref, b_ref, c_ref, y_ref)
    h = lax.fori_loop(0, L, step, h)
    h_scr[...] = h

    @pl.when(c == pl.num_programs(3) - 1)
    def _():
        fin_ref[...] = h


def _bwd_grid_kernel(u_ref, d_ref, k_ref, a_ref, b_ref, c_ref, hs_ref, dy_ref, dfin_ref,
                     du_ref, dd_ref, db_ref, dc_ref, da_ref, dh0_ref, lam_scr, da_scr, ws_ref,
                     *, L):
    c = pl.program_id(3)  # chunk nc-1-c: the index maps run backwards

    @pl.when(c == 0)
    def _():
        lam_scr[...] = dfin_ref[...]
        da_scr[...] = jnp.zeros(da_scr.shape, F32)

    A = a_ref[...]
    ins = (u_ref, d_ref, k_ref, b_ref, c_ref, dy_ref)
    _recompute(0, L, hs_ref[...], A, ins, ws_ref)
    lam, dA = _reverse(0, L, (lam_scr[...], da_scr[...]), A, ws_ref, ins,
                       (du_ref, dd_ref, db_ref, dc_ref))
    lam_scr[...] = lam
    da_scr[...] = dA

    @pl.when(c == pl.num_programs(3) - 1)
    def _():
        dh0_ref[...] = lam
        da_ref[...] = dA


# ----------------------------------------------------------------------------- calls


class _Geo:
    """Static sizes from the kernel-layout u [B G SP 1 RP] and B [B G SP N 1]: chunk L, chunks
    nc, channel block br and blocks nr."""

    def __init__(self, u, Bt, L: int, be: Backend):
        self.b, self.g, self.sp, _, self.rp = u.shape
        self.n = Bt.shape[3]
        self.L, self.nc = L, self.sp // L
        self.br = be.block(self.rp)[0]
        self.nr = self.rp // self.br


def _specs(geo: _Geo, looped: bool, kinds, reverse: bool = False):
    """BlockSpecs by kind over grid (b, g, r) [Triton: whole-sequence tiles] or (b, g, r, c)
    [Mosaic: one chunk per step, chunk nc-1-c when `reverse`]: `chan` [.. 1 br] of [B G SP 1 RP],
    `col` [.. N 1] of [B G SP N 1], `keep` [.. 1 1] of [B SP 1 1], `a` [N br] of [G N RP], `state`
    [N br] of [B G N RP], `hs` [(nc) N br] of [B G NC N RP], `pcol` [.. N 1] of [B G NR SP N 1]
    (per channel block), `ws` [L N br] of [B G NR L N br] (Triton's global workspace)."""
    L, br, n, nc = geo.L, geo.br, geo.n, geo.nc
    if looped:
        sp = geo.sp
        table = {
            "chan": ((None, None, sp, 1, br), lambda b, g, r: (b, g, 0, 0, r)),
            "col": ((None, None, sp, n, 1), lambda b, g, r: (b, g, 0, 0, 0)),
            "keep": ((None, sp, 1, 1), lambda b, g, r: (b, 0, 0, 0)),
            "a": ((None, n, br), lambda b, g, r: (g, 0, r)),
            "state": ((None, None, n, br), lambda b, g, r: (b, g, 0, r)),
            "hs": ((None, None, nc, n, br), lambda b, g, r: (b, g, 0, 0, r)),
            "pcol": ((None, None, None, sp, n, 1), lambda b, g, r: (b, g, r, 0, 0, 0)),
            "ws": ((None, None, None, L, n, br), lambda b, g, r: (b, g, r, 0, 0, 0)),
        }
    else:
        ch = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
        table = {
            "chan": ((None, None, L, 1, br), lambda b, g, r, c: (b, g, ch(c), 0, r)),
            "col": ((None, None, L, n, 1), lambda b, g, r, c: (b, g, ch(c), 0, 0)),
            "keep": ((None, L, 1, 1), lambda b, g, r, c: (b, ch(c), 0, 0)),
            "a": ((None, n, br), lambda b, g, r, c: (g, 0, r)),
            "state": ((None, None, n, br), lambda b, g, r, c: (b, g, 0, r)),
            "hs": ((None, None, None, n, br), lambda b, g, r, c: (b, g, ch(c), 0, r)),
            "pcol": ((None, None, None, L, n, 1), lambda b, g, r, c: (b, g, r, ch(c), 0, 0)),
        }
    return [pl.BlockSpec(*table[k]) for k in kinds]


def _shape(geo: _Geo, kind: str):
    return {"chan": (geo.b, geo.g, geo.sp, 1, geo.rp), "col": (geo.b, geo.g, geo.sp, geo.n, 1),
            "state": (geo.b, geo.g, geo.n, geo.rp), "hs": (geo.b, geo.g, geo.nc, geo.n, geo.rp),
            "pcol": (geo.b, geo.g, geo.nr, geo.sp, geo.n, 1),
            "ws": (geo.b, geo.g, geo.nr, geo.L, geo.n, geo.br)}[kind]


def _call(be: Backend, geo: _Geo, name: str, kernel, ins, in_kinds, out_kinds, scratch=(),
          reverse=False):
    looped = be.suffix == "gpu"
    grid = (geo.b, geo.g, geo.nr) if looped else (geo.b, geo.g, geo.nr, geo.nc)
    extra = {} if looped else {"scratch_shapes": scratch}
    kw = {"L": geo.L, "nc": geo.nc} if looped else {"L": geo.L}
    return pl.pallas_call(
        functools.partial(kernel, **kw), grid=grid,
        in_specs=_specs(geo, looped, in_kinds, reverse),
        out_specs=_specs(geo, looped, out_kinds, reverse),
        out_shape=[jax.ShapeDtypeStruct(_shape(geo, k), F32) for k in out_kinds],
        compiler_params=be.params, interpret=be.interpret,
        name=f"jaxllama_selective_{name}_{be.suffix}", **extra)(*ins)


IN_KINDS = ("chan", "chan", "keep", "a", "col", "col")  # u, delta, keep, A, B, C


@functools.cache
def kernel_scan(be: Backend, L: int):
    """scan(u, delta, keep, A, B, C, h0) -> (y, final) on the kernel layout (module docstring),
    a custom_vjp whose backward is the chunk-recomputing adjoint kernel."""

    def forward(u, d, k, A, Bt, Ct, h0):
        geo = _Geo(u, Bt, L, be)
        scratch = () if be.suffix == "gpu" else _tpu_scratch(geo, ("state",))
        y, hs, fin = _call(be, geo, "fwd", _fwd_grid_kernel if scratch else _fwd_loop_kernel,
                           (u, d, k, A, Bt, Ct, h0), (*IN_KINDS, "state"),
                           ("chan", "hs", "state"), scratch)
        return (y, fin), hs

    @jax.custom_vjp
    def scan(u, d, k, A, Bt, Ct, h0):
        return forward(u, d, k, A, Bt, Ct, h0)[0]

    def scan_fwd(u, d, k, A, Bt, Ct, h0):
        out, hs = forward(u, d, k, A, Bt, Ct, h0)
        return out, (u, d, k, A, Bt, Ct, hs)

    def scan_bwd(res, cts):
        u, d, k, A, Bt, Ct, hs = res
        dy, dfin = cts
        geo = _Geo(u, Bt, L, be)
        looped = be.suffix == "gpu"
        outs = ("chan", "chan", "pcol", "pcol", "state", "state") + (("ws",) if looped else ())
        scratch = () if looped else _tpu_scratch(geo, ("state", "state", "ws"))
        kernel = (functools.partial(_bwd_loop_kernel, barrier=not be.interpret) if looped
                  else _bwd_grid_kernel)
        res = _call(be, geo, "bwd", kernel,
                    (u, d, k, A, Bt, Ct, hs, dy, dfin), (*IN_KINDS, "hs", "chan", "state"),
                    outs, scratch, reverse=True)
        du, dd, db, dc, da, dh0 = res[:6]
        return (du, dd, jnp.zeros_like(k), da.sum(0), db.sum(2), dc.sum(2), dh0)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan


def _tpu_scratch(geo: _Geo, kinds):
    from jax.experimental.pallas import tpu as pltpu

    shapes = {"state": (geo.n, geo.br), "ws": (geo.L, geo.n, geo.br)}
    return [pltpu.VMEM(shapes[k], F32) for k in kinds]


# ----------------------------------------------------------------------------- the api form


def selective_fn(be: Backend):
    """selective(u, delta, A, B, C, D, initial_state, segment_ids, chunk) through the kernels of
    `be`: the reference's semantics (reference.selective_sequential), the layout copies and the D
    term in XLA."""

    def selective(u, delta, A, B, C, D, initial_state, segment_ids, chunk):
        b, s, dm = u.shape
        g, n = B.shape[2:]
        r = dm // g
        L = int(chunk)
        if L < 1:
            raise ValueError(f"selective_scan: chunk_size must be positive, got {chunk}")
        sp = round_up(s, L)
        rp = be.block(r)[1]
        npad = _pow2(n) if be.pad_pow2 else n
        valid, run = reference.segment_runs(segment_ids, b, s)
        keep = 1.0 - pad_to(reference._resets(run), {1: sp}).astype(F32)  # [b sp]
        uf = u.astype(F32)
        df = jnp.where(valid[..., None], delta.astype(F32), 0.0)

        def chan(a):  # [b s dm] -> [b g sp 1 rp]
            a = pad_to(pad_to(a, {1: sp}).reshape(b, sp, g, r), {3: rp})
            return jnp.transpose(a, (0, 2, 1, 3))[:, :, :, None]

        def col(a):  # [b s g n] -> [b g sp npad 1]
            a = pad_to(a.astype(F32), {1: sp, 3: npad})
            return jnp.transpose(a, (0, 2, 1, 3))[..., None]

        def state_in(h):  # [b dm n] -> [b g npad rp]
            h = pad_to(h.astype(F32).reshape(b, g, r, n), {2: rp, 3: npad})
            return jnp.swapaxes(h, 2, 3)

        At = jnp.swapaxes(pad_to(A.astype(F32).reshape(g, r, n), {1: rp, 2: npad}), 1, 2)
        h0 = (jnp.zeros((b, g, npad, rp), F32) if initial_state is None
              else state_in(initial_state))
        y, fin = kernel_scan(be, L)(chan(uf), chan(df), keep[:, :, None, None], At, col(B),
                                    col(C), h0)
        y = jnp.transpose(y[:, :, :s, 0, :r], (0, 2, 1, 3)).reshape(b, s, dm)
        final = jnp.swapaxes(fin[:, :, :n, :r], 2, 3).reshape(b, dm, n)
        y = y + reference._d_term(uf, D)
        return jnp.where(valid[..., None], y, 0.0).astype(u.dtype), final

    return selective


__all__ = ["Backend", "kernel_scan", "selective_fn"]
