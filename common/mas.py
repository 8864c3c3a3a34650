"""Monotonic alignment search (MAS): the best monotonic text-to-frame path through a score matrix.

``maximum_path(value, mask, dtype=torch.float32)`` has the signature and the semantics of
``super_monotonic_align.maximum_path`` (and of the Glow-TTS / Matcha-TTS Cython ``maximum_path``):

- ``value`` and ``mask`` are ``[B, T_text, T_mel]``; the result is a 0/1 path of the same shape in ``dtype``.
- Per item, the lengths come from the mask exactly as those implementations read them:
  ``t_x = mask[b, :, 0].sum()`` (text tokens) and ``t_y = mask[b, 0, :].sum()`` (mel frames). Only the
  rectangle ``[:t_x, :t_y]`` is read; everything outside it is ignored and the path is 0 there. (Those
  implementations multiply the values by the mask first, which is the same thing for the rectangular masks built
  from two sequence masks; holes inside the rectangle are not supported.) ``value`` is never modified.
- Every frame ``y < t_y`` is given exactly one token, the token index never decreases along the frames, the path
  starts at (0, 0) and ends at (t_x - 1, t_y - 1), so with ``t_y >= t_x`` every token gets at least one frame.
  With ``t_x == t_y`` the path is the diagonal.
- The path maximises the sum of the scores it visits. The recurrence, computed in float32 (float64 for float64
  input), is the Cython one: ``Q[x, y] = max(Q[x, y-1], Q[x-1, y-1]) + value[x, y]`` over the band of cells that
  lie on some complete path, where a missing predecessor counts as ``-1e9``. Backtracking from the last cell
  moves to the previous token when ``x == y`` or when ``Q[x, y-1] < Q[x-1, y-1]`` strictly, so ties stay on the
  same token (the later token gets the extra frames). All back-ends here give bit-identical paths.
- Degenerate items: an empty mask gives an all-zero path; ``t_y < t_x`` (fewer frames than tokens, no valid
  path) gives frame ``y`` to token ``y + t_x - t_y`` (the first tokens get no frame). NaN scores are unsupported.

Back-ends, chosen by ``backend=`` ('auto' picks the first that applies, see ``backend_name``):

1. ``'sma'``: ``super_monotonic_align`` when it is importable and the tensors are on CUDA.
2. ``'triton'``: our Triton kernel on CUDA (also runs on CPU tensors under ``TRITON_INTERPRET=1``).
3. ``'numba'``: our compiled, batch-parallel CPU kernel.
4. ``'reference'``: plain numpy, for tests.

Importing this module needs neither triton nor numba nor a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import threading

import numpy as np
import torch

__all__ = ["maximum_path", "maximum_path_reference", "backend_name", "available_backends", "BACKENDS"]

BACKENDS = ("auto", "sma", "triton", "numba", "reference")
NEG = -1e9  # score of a missing predecessor (same constant as Glow-TTS, Matcha-TTS and super-monotonic-align)
LOG_FLOOR = -50.0  # callers floor log-probability scores here (keeps -inf out of MAS)


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the back-ends
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check_inputs(value: torch.Tensor, mask: torch.Tensor) -> None:
    if value.dim() != 3:
        raise ValueError(f"value must be [B, T_text, T_mel], got shape {tuple(value.shape)}")
    if mask.shape != value.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from value shape {tuple(value.shape)}")
    if not (value.is_floating_point()):
        raise ValueError(f"value must be a floating tensor, got {value.dtype}")


def _lengths(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_x, t_y) per item as int32, read the way super-monotonic-align reads them (``mask.sum(1)[:, 0]`` and
    ``mask.sum(2)[:, 0]``) but from one column / one row only instead of summing the whole mask."""
    B, T, S = mask.shape
    if T == 0 or S == 0:
        zeros = torch.zeros(B, dtype=torch.int32, device=mask.device)
        return zeros, zeros.clone()
    if mask.device.type == "cpu" and mask.dtype != torch.bfloat16:
        m = mask.detach().numpy()  # strided reductions are much cheaper in numpy than in torch on CPU
        t_x = np.ascontiguousarray(m[:, :, 0]).sum(1).astype(np.int32)
        t_y = np.ascontiguousarray(m[:, 0, :]).sum(1).astype(np.int32)
        return torch.from_numpy(t_x), torch.from_numpy(t_y)
    return mask[:, :, 0].sum(1).to(torch.int32), mask[:, 0, :].sum(1).to(torch.int32)


def _dp_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _path_from_indices(idx: torch.Tensor, t_x: torch.Tensor, t_y: torch.Tensor, T: int, dtype: torch.dtype
                       ) -> torch.Tensor:
    """Expand per-frame token indices [B, S] into a 0/1 path [B, T, S]; frames >= t_y (or items with t_x == 0)
    stay empty."""
    B, S = idx.shape
    device = idx.device
    valid = (torch.arange(S, device=device)[None, :] < t_y[:, None].to(device)) & (t_x[:, None].to(device) > 0)
    idx = torch.where(valid, idx.long(), 0)
    work_dtype = torch.uint8 if dtype == torch.bool else dtype
    path = torch.zeros((B, T, S), dtype=work_dtype, device=device)
    if T > 0 and S > 0:
        path.scatter_(1, idx[:, None, :], valid[:, None, :].to(work_dtype))
    return path.view(torch.bool) if dtype == torch.bool else path


# ----------------------------------------------------------------------------------------------------------------
# 4. reference (numpy, column by column; the specification the other back-ends must match bit for bit)
# ----------------------------------------------------------------------------------------------------------------
def _reference_indices(v: np.ndarray, tx: int, ty: int) -> np.ndarray:
    """Token index per frame (length ty) for one item; v is [>=tx, >=ty] in the DP dtype."""
    if tx > ty:
        return np.arange(ty) + (tx - ty)
    neg = v.dtype.type(NEG)
    q = np.full((tx, ty), np.nan, dtype=v.dtype)  # NaN marks cells outside the band (never read)
    q[0, 0] = v[0, 0]
    for y in range(1, ty):
        lo, hi = max(0, tx + y - ty), min(tx, y + 1)
        xs = np.arange(lo, hi)
        same = np.where(xs < y, q[np.minimum(xs, y - 1), y - 1], neg)    # stay on token x
        prev = np.where(xs > 0, q[np.maximum(xs - 1, 0), y - 1], neg)    # come from token x - 1
        q[lo:hi, y] = np.where(prev > same, prev, same) + v[lo:hi, y]
    idx = np.empty(ty, dtype=np.int64)
    x = tx - 1
    for y in range(ty - 1, -1, -1):
        idx[y] = x
        if y > 0 and x != 0 and (x == y or q[x, y - 1] < q[x - 1, y - 1]):
            x -= 1
    return idx


def maximum_path_reference(value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32
                           ) -> torch.Tensor:
    """Plain numpy MAS (slow; for tests). Same contract as ``maximum_path``."""
    _check_inputs(value, mask)
    B, T, S = value.shape
    t_x, t_y = _lengths(mask)
    v = value.detach().to("cpu", _dp_dtype(value.dtype)).numpy()
    idx = np.zeros((B, S), dtype=np.int64)
    for b in range(B):
        tx, ty = int(t_x[b]), int(t_y[b])
        if tx > 0 and ty > 0:
            idx[b, :ty] = _reference_indices(v[b], tx, ty)
    path = _path_from_indices(torch.from_numpy(idx), t_x.cpu(), t_y.cpu(), T, dtype)
    return path.to(value.device)


# ----------------------------------------------------------------------------------------------------------------
# 3. numba CPU kernel
# ----------------------------------------------------------------------------------------------------------------
_NUMBA_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _numba_kernel():
    """The compiled kernels (``common/mas_numba.py``, loaded from numba's cache after the first run). Returns None
    when numba is missing."""
    try:
        import numba
    except ImportError:
        return None
    # numba's default OpenMP layer next to torch's own OpenMP runtime costs ~8 ms per call on small machines
    # (the two thread pools spin against each other); the workqueue layer has no such cost. Only chosen when
    # the user has not picked a layer and numba's parallel back-end has not started yet.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        try:
            numba.threading_layer()
        except ValueError:  # not initialised yet
            numba.config.THREADING_LAYER = "workqueue"
    from common import mas_numba as K

    return numba, K.batch_parallel, K.batch_serial, K.serial_fused


def set_threads(n: int, numba_n: int | None = None) -> tuple[int, int | None]:
    """Set the calling thread's CPU thread count for torch's ops (``n``) and for the numba kernels (``numba_n``,
    default ``n``; both are kept per thread: OpenMP's setting and numba's thread mask). Returns the previous
    counts, to restore them with ``set_threads(*previous)``."""
    loaded = _numba_kernel() if _numba_available() else None
    before = (torch.get_num_threads(), loaded[0].get_num_threads() if loaded is not None else None)
    torch.set_num_threads(n)
    if loaded is not None:
        loaded[0].set_num_threads(max(1, min(numba_n or n, loaded[0].config.NUMBA_NUM_THREADS)))
    return before


def _numba_fill():
    from common.mas_numba import fill

    return fill


_WORK: dict = {}  # numpy dtype -> the DP scratch [threads, cells], kept between calls
_SERIAL_CELLS = 100_000  # below this many DP cells, waking the thread pool costs more than it saves


def _work_buffer(rows: int, cols: int, dtype=np.float32) -> np.ndarray:
    buf = _WORK.get(np.dtype(dtype))
    if buf is None or buf.shape[0] < rows or buf.shape[1] < cols:
        old = (0, 0) if buf is None else buf.shape
        buf = np.empty((max(rows, old[0]), max(cols, old[1])), dtype=dtype)
        _WORK[np.dtype(dtype)] = buf
    return buf


def _numba_available() -> bool:
    return _has_module("numba")


def _dp_values(value: torch.Tensor) -> tuple[np.ndarray, type]:
    """The scores as a contiguous CPU numpy array in the DP dtype (shares memory with ``value`` when it already
    is one; the kernels only read it), and that numpy dtype."""
    work_dtype = _dp_dtype(value.dtype)
    v = value.detach()
    if v.device.type != "cpu" or v.dtype != work_dtype or not v.is_contiguous():
        v = v.to("cpu", work_dtype).contiguous()
    return v.numpy(), (np.float64 if work_dtype == torch.float64 else np.float32)


def _maximum_path_numba(value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    loaded = _numba_kernel()
    if loaded is None:
        raise RuntimeError("backend 'numba' needs the numba package (pip install numba)")
    numba, batch_parallel, batch_serial, serial_fused = loaded
    B, T, S = value.shape
    device = value.device
    if (B > 0 and T > 0 and S > 0 and dtype in (torch.float32, torch.float64)
            and (B == 1 or B * T * S < _SERIAL_CELLS or numba.get_num_threads() == 1)):
        return _maximum_path_numba_small(serial_fused, value, mask, dtype)
    t_x, t_y = _lengths(mask)
    tx_np = t_x.cpu().numpy()
    ty_np = t_y.cpu().numpy()
    v, np_dtype = _dp_values(value)
    cells = tx_np.astype(np.int64) * ty_np.astype(np.int64)
    idx = np.zeros((B, S), dtype=np.int32)
    if B > 0 and cells.max() > 0:
        # longest items first with dynamic scheduling balances ragged batches over the threads
        order = np.argsort(-cells, kind="stable")
        with _NUMBA_LOCK:  # the workqueue layer and the shared scratch must not be used concurrently
            if B == 1 or int(cells.sum()) < _SERIAL_CELLS or numba.get_num_threads() == 1:
                batch_serial(v, tx_np, ty_np, order, np_dtype(NEG), idx, _work_buffer(1, int(cells.max()), np_dtype))
            else:
                work = _work_buffer(numba.get_num_threads(), int(cells.max()), np_dtype)
                with numba.parallel_chunksize(1):
                    batch_parallel(v, tx_np, ty_np, order, np_dtype(NEG), idx, work)
    return _path_from_indices_np(idx, tx_np, ty_np, T, dtype, device)


def _maximum_path_numba_small(serial_fused, value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
                              ) -> torch.Tensor:
    """One item, or a batch too small for threads: one compiled call does lengths, DP and path fill."""
    B, T, S = value.shape
    v, np_dtype = _dp_values(value)
    m = mask.detach()
    if m.device.type != "cpu" or m.dtype in (torch.bfloat16, torch.float16):
        m = m.to("cpu", torch.float32 if m.dtype in (torch.bfloat16, torch.float16) else m.dtype)
    path = torch.zeros((B, T, S), dtype=dtype)
    with _NUMBA_LOCK:
        serial_fused(v, m.numpy(), np_dtype(NEG), path.numpy(), _work_buffer(1, T * S, np_dtype)[0])
    return path.to(value.device)


def _path_from_indices_np(idx: np.ndarray, tx: np.ndarray, ty: np.ndarray, T: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """Like ``_path_from_indices`` for CPU results, with numpy fancy indexing (cheaper for small inputs)."""
    B, S = idx.shape
    path = torch.zeros((B, T, S), dtype=dtype)
    try:
        path_np = path.numpy()
    except TypeError:  # bfloat16 and other dtypes numpy cannot view
        return _path_from_indices(torch.from_numpy(idx), torch.from_numpy(tx), torch.from_numpy(ty), T, dtype
                                  ).to(device)
    if dtype in (torch.float32, torch.float64):  # the common case: one compiled loop, no index arrays
        _numba_fill()(path_np, idx, tx, ty)
        return path.to(device)
    valid = (np.arange(S)[None, :] < ty[:, None]) & (tx[:, None] > 0)
    bb, yy = np.nonzero(valid)
    path_np[bb, idx[bb, yy], yy] = 1
    return path.to(device)


# ----------------------------------------------------------------------------------------------------------------
# 2. Triton kernel (one program per item, loop over mel frames)
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """Define the kernel lazily so that importing this module never needs triton, and so that
    ``TRITON_INTERPRET=1`` set before the first call is honoured."""
    import triton
    import triton.language as tl

    @triton.jit
    def mas_kernel(q_ptr, idx_ptr, tx_ptr, ty_ptr, T, S, neg, BLOCK_T: tl.constexpr):
        # q: [B, T, S] copy of the scores, overwritten in place by the DP; idx: [B, S] token per frame (zeros)
        b = tl.program_id(0)
        q_ptr += b.to(tl.int64) * T * S
        idx_ptr += b.to(tl.int64) * S
        tx = tl.load(tx_ptr + b)
        ty = tl.load(ty_ptr + b)
        xs = tl.arange(0, BLOCK_T)
        if tx > 0 and ty >= tx:
            # forward DP, one mel frame (column) per step, all tokens of the column at once
            for y in range(1, ty):
                lo = tl.maximum(tx + y - ty, 0)
                hi = tl.minimum(tx, y + 1)
                band = (xs >= lo) & (xs < hi)
                same = tl.load(q_ptr + xs * S + (y - 1), mask=band & (xs < y), other=neg)
                prev = tl.load(q_ptr + (xs - 1) * S + (y - 1), mask=band & (xs > 0), other=neg)
                score = tl.load(q_ptr + xs * S + y, mask=band, other=0.0)
                best = tl.where(prev > same, prev, same)
                tl.store(q_ptr + xs * S + y, best + score, mask=band)
                tl.debug_barrier()  # column y must be visible to every lane before column y + 1 reads it
            # backtracking, scalar
            x = tx - 1
            for y in range(ty - 1, 0, -1):
                tl.store(idx_ptr + y, x)
                if x != 0:
                    if x == y:
                        x -= 1
                    else:
                        q_same = tl.load(q_ptr + x * S + (y - 1))
                        q_prev = tl.load(q_ptr + (x - 1) * S + (y - 1))
                        if q_same < q_prev:
                            x -= 1
            tl.store(idx_ptr, x)
        elif tx > 0:  # fewer frames than tokens: frame y -> token y + tx - ty
            for y in range(0, ty):
                tl.store(idx_ptr + y, y + tx - ty)

    return triton, mas_kernel


def _triton_available(device: torch.device) -> bool:
    if not _has_module("triton"):
        return False
    return device.type == "cuda" or (device.type == "cpu" and _triton_interpreting())


def _maximum_path_triton(value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not _triton_available(value.device):
        raise RuntimeError("backend 'triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    triton, kernel = _triton_kernel()
    B, T, S = value.shape
    t_x, t_y = _lengths(mask)
    q = torch.empty((B, T, S), dtype=_dp_dtype(value.dtype), device=value.device)
    q.copy_(value.detach())
    idx = torch.zeros((B, S), dtype=torch.int32, device=value.device)
    if B > 0 and T > 0 and S > 0:
        block_t = max(triton.next_power_of_2(T), 16)
        num_warps = 1 if block_t <= 256 else 4
        if value.device.type == "cuda":
            with torch.cuda.device(value.device):
                kernel[(B,)](q, idx, t_x, t_y, T, S, NEG, BLOCK_T=block_t, num_warps=num_warps)
        else:
            kernel[(B,)](q, idx, t_x, t_y, T, S, NEG, BLOCK_T=block_t, num_warps=num_warps)
    return _path_from_indices(idx, t_x, t_y, T, dtype)


# ----------------------------------------------------------------------------------------------------------------
# 1. super-monotonic-align
# ----------------------------------------------------------------------------------------------------------------
def _sma_available(device: torch.device) -> bool:
    return device.type == "cuda" and _has_module("super_monotonic_align")


def _maximum_path_sma(value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not _sma_available(value.device):
        raise RuntimeError("backend 'sma' needs the super_monotonic_align package and a CUDA tensor")
    from super_monotonic_align import maximum_path as sma_maximum_path

    # super-monotonic-align masks and overwrites its input in place: give it a private contiguous copy
    work = value.detach().clone(memory_format=torch.contiguous_format)
    return sma_maximum_path(work, mask, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------
def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Back-ends that can run for tensors on ``device``, in 'auto' preference order."""
    device = torch.device(device)
    names = []
    if _sma_available(device):
        names.append("sma")
    if _triton_available(device):
        names.append("triton")
    if _numba_available():
        names.append("numba")
    names.append("reference")
    return names


def backend_name(device: torch.device | str = "cpu") -> str:
    """The back-end ``maximum_path(..., backend='auto')`` uses for tensors on ``device``."""
    device = torch.device(device)
    if _sma_available(device):
        return "sma"
    if device.type == "cuda" and _triton_available(device):
        return "triton"
    if _numba_available():
        return "numba"
    return "reference"


_IMPLS = {
    "sma": _maximum_path_sma,
    "triton": _maximum_path_triton,
    "numba": _maximum_path_numba,
    "reference": maximum_path_reference,
}


@torch.no_grad()
def maximum_path(value: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                 backend: str = "auto") -> torch.Tensor:
    """Monotonic alignment search. value, mask: [B, T_text, T_mel]; returns the 0/1 path [B, T_text, T_mel] in
    ``dtype`` on value's device. See the module docstring for the exact semantics."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MAS backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_inputs(value, mask)
    name = backend_name(value.device) if backend == "auto" else backend
    return _IMPLS[name](value, mask, dtype)


def mas_frames(scores: list[torch.Tensor], frame_lens: list[int]) -> list[np.ndarray]:
    """Batch MAS: per-utterance [U_b, T_b] scores -> per-row frame counts (int64 arrays, sum = T_b). On the CPU
    with numba, the rows go to the kernel as they are (no padded [B, U, T] scores, mask and path: those cost
    several times the DP), on the calling thread; elsewhere through ``maximum_path``."""
    if scores and all(s.device.type == "cpu" for s in scores) and _numba_available():
        from common.mas_numba import frame_counts

        rows = [s.detach()[:, :t].to(torch.float32).contiguous().numpy().ravel() for s, t in zip(scores, frame_lens)]
        t_x = np.asarray([s.shape[0] for s in scores], dtype=np.int64)
        t_y = np.asarray([min(t, s.shape[1]) for s, t in zip(scores, frame_lens)], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int64)
        c_off = np.concatenate([[0], np.cumsum(t_x)]).astype(np.int64)
        counts = np.empty(int(c_off[-1]), dtype=np.int64)
        work = np.empty(max(1, int((t_x * t_y).max())), dtype=np.float32)
        flat = np.concatenate(rows)
        frame_counts(flat, offsets, t_x, t_y, np.float32(NEG), counts, c_off, work)
        return [counts[c_off[b]:c_off[b + 1]].copy() for b in range(len(scores))]
    B = len(scores)
    U = max(s.shape[0] for s in scores)
    T = max(frame_lens)
    dev = scores[0].device
    value = torch.zeros(B, U, T, device=dev)
    mask = torch.zeros(B, U, T, device=dev)
    for b, (s, t) in enumerate(zip(scores, frame_lens)):
        value[b, : s.shape[0], :t] = s[:, :t]
        mask[b, : s.shape[0], :t] = 1
    path = maximum_path(value, mask)
    counts = path.sum(-1).long().cpu().numpy()
    return [counts[b, : s.shape[0]] for b, s in enumerate(scores)]
