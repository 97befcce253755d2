"""Pure-jnp selective scans: the specification (sequential `lax.scan`) and the `xla` implementation
(chunked SSD for Mamba2, a chunked associative scan for Mamba1). State is float32 whatever the
input dtype; outputs come back in the input dtype.

Mamba2 (SSD), per batch row, head h of group g = h // (H / G):
    state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t (outer) B_t        state [P N]
    y_t     = state_t . C_t + D_h x_t
x [B S H P], dt [B S H] (already softplus(dt + bias) and clamped), A [H] (negative), B, C [B S G N],
D None | [H] | [H P], state [B H P N].

Mamba1 (selective scan), channel d of group g = d // (Dm / G), A [Dm N] (decay per channel and state):
    state_t = exp(delta_t A_d) state_{t-1} + delta_t u_t B_t           state [N] per channel
    y_t     = state_t . C_t + D_d u_t
u, delta [B S Dm], B, C [B S G N], D None | [Dm], state [B Dm N].

Segments (`segment_ids` [B S] int, optional): a position with id 0 contributes nothing (its dt is
zero: decay 1, no input), leaves the state unchanged and outputs 0 (left/right padding). Where the
id changes to a new nonzero id (compared with the last nonzero id before it) the state resets to zero
first (packed rows). The initial state carries into the first nonzero segment only. `segment_runs`
turns the ids into (valid, run): run counts the resets so far, so two positions share state history
exactly when their runs are equal, which is how the chunked forms mask without a sequential pass.

The chunked SSD (METHODS section 9) per chunk of L steps, with cum = cumsum of dt A in the chunk:
  (1) intra-chunk quadratic term  y_i += sum_{j<=i, same run} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j
  (2) chunk states                S_c = sum_{j in run of the chunk end} exp(cum_L - cum_j) dt_j x_j B_j
  (3) inter-chunk recurrence      H_{c+1} = exp(cum_L) [run unbroken] H_c + S_c   (H_0 = initial)
  (4) state-to-output             y_i += exp(cum_i) [run of H_c] C_i . H_c
Steps (1)+(4) and (2) are the chunk-local work (`chunk_output`, `chunk_state`); the Pallas modules
replace exactly these two with kernels and share the rest (`ssd_chunked(..., ops=...)`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxllama.kernels._common import F32, cdiv, pad_to

# ----------------------------------------------------------------------------- segments


def segment_runs(segment_ids, b: int, s: int):
    """(valid [B S] bool, run [B S] int32) from segment ids [B S] (None: all valid, one run)."""
    if segment_ids is None:
        return jnp.ones((b, s), bool), jnp.zeros((b, s), jnp.int32)
    seg = jnp.asarray(segment_ids, jnp.int32)
    valid = seg != 0
    idx = lax.cummax(jnp.where(valid, jnp.arange(s, dtype=jnp.int32), -1), axis=1)
    last = jnp.where(idx >= 0, jnp.take_along_axis(seg, jnp.maximum(idx, 0), axis=1), 0)
    before = jnp.pad(last[:, :-1], ((0, 0), (1, 0)))  # last nonzero id strictly before t
    reset = valid & (before != 0) & (seg != before)
    return valid, jnp.cumsum(reset.astype(jnp.int32), axis=1)


def _resets(run):
    """[B S] bool: the state is zeroed before step t."""
    return jnp.diff(run, axis=1, prepend=jnp.zeros_like(run[:, :1])) > 0


def _d_term(x, D):
    """D x for x [B S H P] (D [H] or [H P]) or x [B S Dm] (D [Dm]); 0 when D is None."""
    if D is None:
        return 0.0
    D = D.astype(F32)
    if x.ndim == 4 and D.ndim == 1:
        D = D[:, None]
    return x * D


# ----------------------------------------------------------------------------- specification


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None):
    """Mamba2 by the recurrence, one step at a time: the specification. Returns (y [B S H P] in
    x.dtype, final state [B H P N] float32)."""
    b, s, h, p = x.shape
    g, n = B.shape[2:]
    valid, run = segment_runs(segment_ids, b, s)
    xf = x.astype(F32)
    dtf = jnp.where(valid[..., None], dt.astype(F32), 0.0)
    state = (jnp.zeros((b, h, p, n), F32) if initial_state is None
             else initial_state.astype(F32))

    def step(state, inp):
        x_t, dt_t, b_t, c_t, reset_t = inp  # [b h p], [b h], [b g n], [b g n], [b]
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        dx = (dt_t[..., None] * x_t).reshape(b, g, h // g, p)
        inc = jnp.einsum("bgrp,bgn->bgrpn", dx, b_t.astype(F32)).reshape(b, h, p, n)
        state = jnp.exp(dt_t * A.astype(F32))[..., None, None] * state + inc
        y = jnp.einsum("bgrpn,bgn->bgrp", state.reshape(b, g, h // g, p, n), c_t.astype(F32))
        return state, y.reshape(b, h, p)

    tm = lambda a: jnp.moveaxis(a, 1, 0)
    final, ys = lax.scan(step, state, (tm(xf), tm(dtf), tm(B), tm(C), tm(_resets(run))))
    y = jnp.moveaxis(ys, 0, 1) + _d_term(xf, D)
    return jnp.where(valid[..., None, None], y, 0.0).astype(x.dtype), final


def selective_sequential(u, delta, A, B, C, D=None, initial_state=None, segment_ids=None):
    """Mamba1 by the recurrence, one step at a time: the specification. Returns (y [B S Dm] in
    u.dtype, final state [B Dm N] float32)."""
    b, s, dm = u.shape
    g, n = B.shape[2:]
    valid, run = segment_runs(segment_ids, b, s)
    uf = u.astype(F32)
    df = jnp.where(valid[..., None], delta.astype(F32), 0.0)
    state = jnp.zeros((b, dm, n), F32) if initial_state is None else initial_state.astype(F32)

    def step(state, inp):
        u_t, d_t, b_t, c_t, reset_t = inp  # [b dm], [b dm], [b g n], [b g n], [b]
        state = jnp.where(reset_t[:, None, None], 0.0, state)
        inc = ((d_t * u_t).reshape(b, g, dm // g)[..., None] * b_t.astype(F32)[:, :, None])
        state = jnp.exp(d_t[..., None] * A.astype(F32)) * state + inc.reshape(b, dm, n)
        y = jnp.einsum("bgrn,bgn->bgr", state.reshape(b, g, dm // g, n), c_t.astype(F32))
        return state, y.reshape(b, dm)

    tm = lambda a: jnp.moveaxis(a, 1, 0)
    final, ys = lax.scan(step, state, (tm(uf), tm(df), tm(B), tm(C), tm(_resets(run))))
    y = jnp.moveaxis(ys, 0, 1) + _d_term(uf, D)
    return jnp.where(valid[..., None], y, 0.0).astype(u.dtype), final


# ----------------------------------------------------------------------------- chunked SSD


class ChunkOps(NamedTuple):
    """The chunk-local work of the chunked SSD (all float32, chunks on axis 1, L steps each):
      state(x [B C L H P], coef [B C L H], B [B C L G N]) -> S [B C H P N]
          S = sum_l coef_l x_l (outer) B_l   (coef = dt times the decay to the chunk end)
      output(x, dt, cum [B C L H], run [B C L], B, C, s_out [B C L H], H_in [B C H P N])
          -> y [B C L H P]: the intra-chunk term plus s_out_i C_i . H_in."""

    state: object
    output: object


def chunk_state_jnp(x, coef, B):
    b, c, L, h, p = x.shape
    g = B.shape[3]
    xw = (coef[..., None] * x).reshape(b, c, L, g, h // g, p)
    return jnp.einsum("bclgrp,bclgn->bcgrpn", xw, B).reshape(b, c, h, p, B.shape[-1])


def intra_mask(cum_i, cum_j, run_i, run_j, causal):
    """exp(cum_i - cum_j) where j <= i in the same run, else 0 (masked before exp: no overflow)."""
    ok = causal & (run_i == run_j)
    return jnp.exp(jnp.where(ok, cum_i - cum_j, -jnp.inf))


def chunk_output_jnp(x, dt, cum, run, B, C, s_out, H_in):
    b, c, L, h, p = x.shape
    g = B.shape[3]
    causal = jnp.tril(jnp.ones((L, L), bool))[None, None, :, :, None]
    m = intra_mask(cum[:, :, :, None], cum[:, :, None], run[:, :, :, None, None],
                   run[:, :, None, :, None], causal)  # [b c i j h]
    cb = jnp.einsum("bcign,bcjgn->bcijg", C, B)
    w = (m.reshape(b, c, L, L, g, h // g) * cb[..., None])
    dx = (dt[..., None] * x).reshape(b, c, L, g, h // g, p)
    y = jnp.einsum("bcijgr,bcjgrp->bcigrp", w, dx)
    ys = jnp.einsum("bcign,bcgrpn->bcigrp", C, H_in.reshape(b, c, g, h // g, p, -1))
    y = y + s_out.reshape(b, c, L, g, h // g)[..., None] * ys
    return y.reshape(b, c, L, h, p)


JNP_OPS = ChunkOps(chunk_state_jnp, chunk_output_jnp)


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None, chunk_size=64,
                ops: ChunkOps = JNP_OPS):
    """Mamba2 by the chunked SSD algorithm (module docstring), differentiated by JAX through
    `ops` (whose kernels carry their own vjp). Any length: the tail chunk is padded with dt = 0
    (decay 1, no input), so padding changes neither outputs nor the final state."""
    b, s, h, p = x.shape
    n = B.shape[3]
    L = int(chunk_size)
    nc = cdiv(s, L)
    valid, run = segment_runs(segment_ids, b, s)
    sp = nc * L
    chunks = lambda a: pad_to(a, {1: sp}).reshape(b, nc, L, *a.shape[2:])
    xf = x.astype(F32)
    dtc = chunks(jnp.where(valid[..., None], dt.astype(F32), 0.0))
    xc, Bc, Cc = chunks(xf), chunks(B.astype(F32)), chunks(C.astype(F32))
    runc = pad_to(run, {1: sp}).at[:, s:].set(run[:, -1:]).reshape(b, nc, L)
    cum = jnp.cumsum(dtc * A.astype(F32), axis=2)  # [b c L h]
    rlast = runc[:, :, -1]
    rprev = jnp.pad(rlast[:, :-1], ((0, 0), (1, 0)))  # the run of the state entering each chunk
    last = cum[:, :, -1:]
    coef = jnp.exp(last - cum) * (runc == rlast[..., None])[..., None] * dtc
    S = ops.state(xc, coef, Bc)  # [b c h p n]
    decay = jnp.exp(last[:, :, 0]) * (rlast == rprev)[..., None]  # [b c h]

    def carry(state, inp):
        d_c, s_c = inp
        return d_c[..., None, None] * state + s_c, state

    h0 = jnp.zeros((b, h, p, n), F32) if initial_state is None else initial_state.astype(F32)
    final, h_in = lax.scan(carry, h0, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(S, 1, 0)))
    s_out = jnp.exp(cum) * (runc == rprev[..., None])[..., None]
    y = ops.output(xc, dtc, cum, runc, Bc, Cc, s_out, jnp.moveaxis(h_in, 0, 1))
    y = y.reshape(b, sp, h, p)[:, :s] + _d_term(xf, D)
    return jnp.where(valid[..., None, None], y, 0.0).astype(x.dtype), final


# ----------------------------------------------------------------------------- Mamba1, chunked


def _combine(left, right):
    """(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): two steps of h -> a h + b composed."""
    return left[0] * right[0], right[0] * left[1] + right[1]


def selective_chunked(u, delta, A, B, C, D=None, initial_state=None, segment_ids=None,
                      chunk_size=128):
    """Mamba1 by an associative scan within chunks of L steps and a sequential carry across them:
    memory [B L Dm N] per chunk instead of [B S Dm N]. A reset is a decay of exactly 0."""
    b, s, dm = u.shape
    g, n = B.shape[2:]
    L = int(min(chunk_size, s))
    nc = cdiv(s, L)
    sp = nc * L
    valid, run = segment_runs(segment_ids, b, s)
    reset = pad_to(_resets(run), {1: sp})
    uf = u.astype(F32)
    df = jnp.where(valid[..., None], delta.astype(F32), 0.0)
    tm = lambda a: jnp.moveaxis(pad_to(a, {1: sp}).reshape(b, nc, L, *a.shape[2:]), 1, 0)
    xs = (tm(uf), tm(df), tm(B.astype(F32)), tm(C.astype(F32)), tm(reset))
    h0 = jnp.zeros((b, dm, n), F32) if initial_state is None else initial_state.astype(F32)
    Af = A.astype(F32)

    def chunk(state, inp):
        u_c, d_c, b_c, c_c, r_c = inp  # [b L dm], [b L dm], [b L g n], [b L g n], [b L]
        a = jnp.exp(d_c[..., None] * Af) * (~r_c)[..., None, None]  # [b L dm n]
        bu = (d_c * u_c).reshape(b, L, g, dm // g)[..., None] * b_c[:, :, :, None]
        a_cum, h_loc = lax.associative_scan(_combine, (a, bu.reshape(b, L, dm, n)), axis=1)
        hs = a_cum * state[:, None] + h_loc
        y = jnp.einsum("blgrn,blgn->blgr", hs.reshape(b, L, g, dm // g, n), c_c)
        return hs[:, -1], y.reshape(b, L, dm)

    final, ys = lax.scan(chunk, h0, xs)
    y = jnp.moveaxis(ys, 0, 1).reshape(b, sp, dm)[:, :s] + _d_term(uf, D)
    return jnp.where(valid[..., None], y, 0.0).astype(u.dtype), final


# ----------------------------------------------------------------------------- per-chunk block math
# One (batch, head, chunk) tile of the chunk-local work, on 2-D float32 values, forward and its
# hand-derived backward: what the Pallas kernels run per program (both backends), so the kernels
# hold no algebra of their own. Columns are [L, 1], rows [1, L] (cum and run arrive in both
# layouts, so no kernel transposes a vector).

NT = (((1,), (1,)), ((), ()))  # a [R, K] x b [C, K] -> [R, C]
TN = (((0,), (0,)), ((), ()))  # a [K, R] x b [K, C] -> [R, C]
NN = (((1,), (0,)), ((), ()))  # a [R, K] x b [K, C] -> [R, C]


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def state_block(x, coef, B):
    """S [P N] = sum_l coef_l x_l (outer) B_l from x [L P], coef [L 1], B [L N]."""
    return _dot(coef * x, B, TN)


def state_block_bwd(x, coef, B, dS):
    """(dx [L P], dcoef [L 1], dB [L N]) of `state_block` under dS [P N]."""
    dxw = _dot(B, dS, NT)  # [L P]
    return coef * dxw, jnp.sum(x * dxw, axis=1, keepdims=True), _dot(coef * x, dS, NN)


def _weights(cum_c, cum_r, run_c, run_r, B, C):
    """(P = (C B^T) o decay mask [L L], the mask's decay M [L L])."""
    L = cum_c.shape[0]
    causal = (lax.broadcasted_iota(jnp.int32, (L, L), 0)
              >= lax.broadcasted_iota(jnp.int32, (L, L), 1))
    m = intra_mask(cum_c, cum_r, run_c, run_r, causal)
    return _dot(C, B, NT) * m, m


def output_block(x, dt, cum_c, cum_r, run_c, run_r, B, C, s, H):
    """y [L P] = the intra-chunk term plus s_i C_i . H, from x [L P], dt, cum_c, run_c, s [L 1],
    cum_r, run_r [1 L], B, C [L N], H [P N] (the state entering the chunk)."""
    p, _ = _weights(cum_c, cum_r, run_c, run_r, B, C)
    return _dot(p, dt * x, NN) + s * _dot(C, H, NT)


def output_block_bwd(x, dt, cum_c, cum_r, run_c, run_r, B, C, s, H, dy):
    """(dx, ddt, dcum_c, dcum_r, dB, dC, ds, dH) of `output_block` under dy [L P]. The mask's
    decay exp(cum_i - cum_j) gives d cum_i = sum_j E_ij and d cum_j = -sum_i E_ij, E = dP o P."""
    p, m = _weights(cum_c, cum_r, run_c, run_r, B, C)
    z = dt * x
    dz = _dot(p, dy, TN)  # [L P]
    dp = _dot(dy, z, NT)  # [L L]
    e = dp * p
    dg = dp * m
    dys = s * dy
    ch = _dot(C, H, NT)  # [L P]
    dC = _dot(dg, B, NN) + _dot(dys, H, NN)
    return (dt * dz, jnp.sum(x * dz, axis=1, keepdims=True), jnp.sum(e, axis=1, keepdims=True),
            -jnp.sum(e, axis=0, keepdims=True), _dot(dg, C, TN), dC,
            jnp.sum(dy * ch, axis=1, keepdims=True), _dot(dys, C, TN))
