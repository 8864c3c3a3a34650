"""numba kernels of ``common.mas`` (the CPU back-end). Imported lazily by ``common.mas`` so that importing it needs
no numba. The kernels live at module level: numba's on-disk cache (``cache=True``) then hits in every new process
(as closures they were recompiled each time, ~2.4 s per process)."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_TILE = 16  # mel frames copied per block: one 64-byte cache line of float32 per text row
DIRECT_CELLS = 400_000  # items with at most t_x * t_y cells are not copied frame-major first (measured faster)


@njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def one_item(v, tx, ty, neg, out, q):
    """MAS for one item. v: [T, S] scores; writes the token index of frames 0..ty-1 into out.

    Cython's recurrence Q[y, x] = max(Q[y-1, x], Q[y-1, x-1]) + v[x, y], stored frame-major in the scratch q
    (viewed as [ty, tx]) so the loop over tokens is contiguous; backtracking compares the stored scores, as
    Cython does. Large items first copy the scores into q (in blocks of _TILE frames, so reads and writes
    stay in cache) and update it in place: that loop vectorises. Small ones read v directly: the copy would
    cost more than it saves (measured, benchmarks/mas_speed.py)."""
    if tx > ty:  # no valid path: frame y -> token y + tx - ty
        for y in range(ty):
            out[y] = y + tx - ty
        return
    Q = q[: tx * ty].reshape((ty, tx))
    copied = tx * ty > DIRECT_CELLS
    if copied:
        for y0 in range(0, ty, _TILE):
            y1 = min(y0 + _TILE, ty)
            for x in range(tx):
                row = v[x, y0:y1]
                for k in range(y1 - y0):
                    Q[y0 + k, x] = row[k]
    else:
        Q[0, 0] = v[0, 0]
    for y in range(1, ty):
        lo = max(0, tx + y - ty)
        hi = min(tx, y + 1)
        p = Q[y - 1]
        c = Q[y]
        a_lo = lo
        if lo == 0:  # token 0: no predecessor token
            a = p[0]
            c[0] = (neg if neg > a else a) + (c[0] if copied else v[0, y])
            a_lo = 1
        a_hi = hi
        if hi == y + 1:  # x == y: the only way in is from token x - 1
            b = p[y - 1]
            c[y] = (b if b > neg else neg) + (c[y] if copied else v[y, y])
            a_hi = y
        # interior tokens; max() equals the reference's "b if b > a else a" for every non-NaN input
        if copied:  # zero-based views so that the loop vectorises (no negative-index checks)
            p_same = p[a_lo:a_hi]
            p_down = p[a_lo - 1:a_hi - 1]
            c_io = c[a_lo:a_hi]
            for i in range(a_hi - a_lo):
                c_io[i] += max(p_same[i], p_down[i])
        else:
            for x in range(a_lo, a_hi):
                c[x] = max(p[x], p[x - 1]) + v[x, y]
    x = tx - 1
    for y in range(ty - 1, 0, -1):
        out[y] = x
        if x != 0 and (x == y or Q[y - 1, x - 1] > Q[y - 1, x]):
            x -= 1
    out[0] = x


@njit(parallel=True, cache=True, nogil=True)
def batch_parallel(values, t_x, t_y, order, neg, out, work):
    """values [B, T, S]; t_x, t_y [B] int32; order: items, largest first; out [B, S] int32 token per frame; work
    [threads, >= max(t_x * t_y)] scratch in the values' dtype for the DP, one row per thread (reused between
    calls, so the big buffer is not page-faulted in again every time)."""
    for i in prange(order.shape[0]):
        b = order[i]
        if t_x[b] > 0 and t_y[b] > 0:
            one_item(values[b], t_x[b], t_y[b], neg, out[b], work[numba.get_thread_id()])


@njit(cache=True, nogil=True)
def frame_counts(flat, offsets, t_x, t_y, neg, counts, count_offsets, work):
    """MAS of ragged items without padding: item b's scores are flat[offsets[b]:][:t_x[b] * t_y[b]] viewed as
    [t_x[b], t_y[b]] (tokens x frames); writes its frames per token into counts[count_offsets[b]:][:t_x[b]]
    (zeros first). work: scratch of >= max(t_x * t_y) values of flat's dtype."""
    out = np.empty(max(1, t_y.max()), dtype=np.int32)
    for b in range(t_x.shape[0]):
        tx = t_x[b]
        ty = t_y[b]
        c = counts[count_offsets[b]:count_offsets[b] + tx]
        c[:] = 0
        if tx <= 0 or ty <= 0:
            continue
        one_item(flat[offsets[b]:offsets[b] + tx * ty].reshape((tx, ty)), tx, ty, neg, out, work)
        for y in range(ty):
            c[out[y]] += 1


@njit(cache=True, nogil=True)
def batch_serial(values, t_x, t_y, order, neg, out, work):
    """``batch_parallel`` on the calling thread (work: one row)."""
    for i in range(order.shape[0]):
        b = order[i]
        if t_x[b] > 0 and t_y[b] > 0:
            one_item(values[b], t_x[b], t_y[b], neg, out[b], work[0])


@njit(cache=True, nogil=True)
def serial_fused(values, mask, neg, path, work):
    """Small inputs in one compiled call (lengths from the mask, DP, path fill): at 1 x 50 x 200 the Python
    and dispatch overhead of the three-step route costs more than the DP itself. values/mask [B, T, S] with
    T, S >= 1; path [B, T, S] zeros (float32/float64), filled in place; work >= max(t_x * t_y) scratch in the
    values' dtype."""
    B, T, S = values.shape
    out = np.empty(S, dtype=np.int32)
    for b in range(B):
        sx = 0.0
        for x in range(T):
            sx += mask[b, x, 0]
        sy = 0.0
        for y in range(S):
            sy += mask[b, 0, y]
        tx = int(sx)
        ty = int(sy)
        if tx <= 0 or ty <= 0:
            continue
        one_item(values[b], tx, ty, neg, out, work)
        for y in range(ty):
            path[b, out[y], y] = 1.0


@njit(cache=True, nogil=True)
def fill(path, idx, t_x, t_y):
    """path[b, idx[b, y], y] = 1 for the valid frames of each item (path is zeros, float32 or float64)."""
    for b in range(path.shape[0]):
        if t_x[b] > 0:
            for y in range(t_y[b]):
                path[b, idx[b, y], y] = 1.0


@njit(cache=True, nogil=True)
def _log_add(x, y):
    if x < y:
        x, y = y, x
    if y == -np.inf or y - x < -40.0:  # log1p(exp(-40)) ~ 4e-18: below half an ulp of the scores (exp() is slow)
        return x
    return x + np.log1p(np.exp(y - x))


@njit(cache=True, nogil=True)
def boundary_posterior_means(v, out, med, var):
    """Forward-backward over the MAS paths of v [S, T] (float64; a path visits states 0..S-1 in order, each for
    >= 1 frame, and scores the sum of its cells): out[s] = the posterior mean of the frame where state s + 1
    begins, med[s] its median (each frame's mass spread over +-half a frame), var[s] its variance (frames^2)
    (``common.hmm``'s numpy twin)."""
    S, T = v.shape
    a = np.full((S, T), -np.inf)
    b = np.full((S, T), -np.inf)
    # only the cells some complete path visits: state s at frame t needs s <= t (each earlier state >= 1 frame) and
    # S - 1 - s <= T - 1 - t (each later one); a band cell's recursion reads band cells only, so the values are
    # those of the whole grid, and the others (-inf in a or in b) add nothing to a posterior
    a[0, 0] = v[0, 0]
    for t in range(1, T):
        lo = max(0, S - T + t)
        if lo == 0:
            a[0, t] = a[0, t - 1] + v[0, t]
        for s in range(max(1, lo), min(S - 1, t) + 1):
            a[s, t] = _log_add(a[s, t - 1], a[s - 1, t - 1]) + v[s, t]
    b[S - 1, T - 1] = 0.0
    for t in range(T - 2, -1, -1):
        for s in range(max(0, S - T + t), min(S - 2, t) + 1):
            b[s, t] = _log_add(b[s, t + 1] + v[s, t + 1], b[s + 1, t + 1] + v[s + 1, t + 1])
        if t >= S - 1:
            b[S - 1, t] = b[S - 1, t + 1] + v[S - 1, t + 1]
    w = np.empty(T)
    for s in range(S - 1):
        # w[t]: the unnormalised posterior that state s + 1 begins at frame t, for the frames a path can (s + 1
        # <= t <= T - S + s + 1: every other frame's is 0)
        t0, t1 = s + 1, T - S + s + 2
        m = -np.inf
        for t in range(t0, t1):
            w[t] = a[s, t - 1] + v[s + 1, t] + b[s + 1, t]
            if w[t] > m:
                m = w[t]
        den = 0.0
        num = 0.0
        for t in range(t0, t1):
            w[t] = np.exp(w[t] - m) if w[t] - m > -80.0 else 0.0  # below: nothing beside the peak's 1
            den += w[t]
            num += w[t] * t
        out[s] = num / den
        sq = 0.0
        for t in range(t0, t1):
            sq += w[t] * (t - out[s]) ** 2
        var[s] = sq / den
        acc = 0.0
        med[s] = T - 1.0
        for t in range(t0, t1):
            p = w[t] / den
            if acc + p >= 0.5:
                med[s] = t - 0.5 + (0.5 - acc) / p
                break
            acc += p
