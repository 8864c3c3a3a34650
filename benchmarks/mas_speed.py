"""Speed of our CPU monotonic alignment search (numba back-end of ``common.mas``) against Matcha-TTS's Cython
``maximum_path`` and the PyPI ``monotonic-alignment-search`` package, on identical random inputs.

    python -m benchmarks.mas_speed [--quick] [--repeat-seconds 0.5]

All three are timed end to end through their public ``maximum_path(value, mask)`` (torch in, torch out), in the
same process and run; ratios are (their time / our time), so > 1 means ours is faster. Every output is checked to
equal ours exactly. A missing package is reported and its column skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from common.mas import maximum_path


def _load_matcha():
    try:
        from matcha.utils.monotonic_align import maximum_path as fn
        return fn, None
    except Exception as exc:  # ImportError, or a Cython extension built against another numpy
        return None, (f"Matcha-TTS Cython maximum_path unavailable ({type(exc).__name__}: {exc}); install with "
                      "`pip install cython wheel && pip install --no-deps --no-build-isolation --no-binary "
                      "matcha-tts matcha-tts`")


def _load_mas_pkg():
    try:
        from monotonic_alignment_search import maximum_path as fn
        return fn, None
    except Exception as exc:
        return None, (f"monotonic-alignment-search unavailable ({type(exc).__name__}: {exc}); "
                      "`pip install monotonic-alignment-search`")


def make_inputs(B: int, T: int, S: int, seed: int = 0):
    """Random scores with ragged lengths (item 0 uses the full size), like a padded training batch."""
    g = torch.Generator().manual_seed(seed)
    value = torch.log_softmax(torch.randn(B, T, S, generator=g), dim=1)
    tx = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    ty = torch.randint(max(1, S // 2), S + 1, (B,), generator=g)
    tx[0], ty[0] = T, S
    ty = torch.maximum(ty, tx)
    mask = (torch.arange(T)[None, :, None] < tx[:, None, None]) & (torch.arange(S)[None, None, :] < ty[:, None, None])
    return value, mask


def best_ms(fn, repeat_seconds: float, min_runs: int = 3) -> float:
    fn()  # warm-up (compilation, page cache)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < repeat_seconds and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller grid")
    ap.add_argument("--repeat-seconds", type=float, default=0.5, help="time budget per measurement")
    args = ap.parse_args(argv)

    torch.set_grad_enabled(False)
    matcha_fn, matcha_err = _load_matcha()
    mas_fn, mas_err = _load_mas_pkg()
    for err in (matcha_err, mas_err):
        if err:
            print("SKIP column:", err)
    try:
        import numba
        threads = numba.get_num_threads()
    except ImportError:
        threads = 0
    print(f"cpu cores: {os.cpu_count()}, numba threads: {threads}, torch threads: {torch.get_num_threads()}, "
          f"load average: {os.getloadavg()[0]:.2f}")

    batches, texts, mels = ([1, 8, 32], [50, 200, 400], [200, 1000, 3000])
    if args.quick:
        batches, texts, mels = ([1, 8], [50, 200], [200, 1000])
    header = (f"{'B':>3} {'T_text':>6} {'T_mel':>6} | {'ours ms':>9} | "
              f"{'cython ms':>9} {'x':>6} | {'mas-pkg ms':>10} {'x':>6}")
    print(header)
    print("-" * len(header))
    worst = {"all": float("inf"), "b>=8": float("inf")}
    for B in batches:
        for T in texts:
            for S in mels:
                if T > S:
                    continue
                value, mask = make_inputs(B, T, S, seed=B * 1000003 + T * 1009 + S)
                ours = maximum_path(value, mask, backend="numba")
                t_ours = best_ms(lambda: maximum_path(value, mask, backend="numba"), args.repeat_seconds)
                row = f"{B:>3} {T:>6} {S:>6} | {t_ours:>9.2f} |"
                if matcha_fn is not None:
                    other = matcha_fn(value, mask)
                    assert torch.equal(other, ours), f"Matcha Cython disagrees at B={B} T={T} S={S}"
                    t_c = best_ms(lambda: matcha_fn(value, mask), args.repeat_seconds)
                    ratio = t_c / t_ours
                    worst["all"] = min(worst["all"], ratio)
                    if B >= 8:
                        worst["b>=8"] = min(worst["b>=8"], ratio)
                    row += f" {t_c:>9.2f} {ratio:>6.2f} |"
                else:
                    row += f" {'-':>9} {'-':>6} |"
                if mas_fn is not None:
                    other = mas_fn(value, mask)
                    assert torch.equal(other, ours), f"monotonic-alignment-search disagrees at B={B} T={T} S={S}"
                    t_m = best_ms(lambda: mas_fn(value, mask), args.repeat_seconds)
                    row += f" {t_m:>10.2f} {t_m / t_ours:>6.2f}"
                else:
                    row += f" {'-':>10} {'-':>6}"
                print(row, flush=True)
    if matcha_fn is not None:
        print(f"all outputs identical. worst ratio vs Cython: {worst['all']:.2f}x overall, "
              f"{worst['b>=8']:.2f}x at batch >= 8 (targets: >= 1.0x and >= 2.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
