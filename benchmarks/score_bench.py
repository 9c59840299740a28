"""ScoreStats (streamed, float64, on the GPU when present) against the in-memory numpy way
that public implementations use (all N x D features held, LogME by an SVD, one slogdet per
class for TransRate): time and peak memory, and that both give the same scores.

    python3 benchmarks/score_bench.py [--n 50000 --d 2048 --c 100] [--device cuda]
                                      [--table PATH]

The numpy side gets the features as one float64 array (what it would load); its peak is
measured with tracemalloc (numpy reports its buffers there). The ScoreStats side streams
batches of 1024 rows that already sit on its device and reports the device's peak memory
(torch.cuda.max_memory_allocated) or, on the CPU, the bytes of its state.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from transfer_fast import ScoreStats


def numpy_logme(f: np.ndarray, y: np.ndarray) -> float:
    """thuml's LogME: per class, the evidence maximised by the fixed point on alpha, beta."""
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = (s ** 2)[:, None]
    evidences = []
    for k in np.unique(y):
        t = (y == k).astype(np.float64)
        x = u.T @ t
        x2 = x ** 2
        res_x2 = (t ** 2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            gamma = (beta * sigma[:, 0] / (alpha + beta * sigma[:, 0])).sum()
            m2 = (beta ** 2 * sigma[:, 0] * x2[:] / (alpha + beta * sigma[:, 0]) ** 2).sum()
            res2 = (x2 / (1 + beta / alpha * sigma[:, 0]) ** 2).sum() + res_x2
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                    - 0.5 * np.log(alpha + beta * sigma[:, 0]).sum() - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def numpy_hscore(f: np.ndarray, y: np.ndarray) -> float:
    g = np.zeros_like(f)
    for k in np.unique(y):
        g[y == k] = f[y == k].mean(0)
    return float(np.trace(np.linalg.pinv(np.cov(f, rowvar=False), rcond=1e-15)
                          @ np.cov(g, rowvar=False)))


def numpy_transrate(f: np.ndarray, y: np.ndarray, eps: float = 1e-4) -> float:
    def rate(z):
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]
    z = f - f.mean()
    classes = np.unique(y)
    return float(rate(z) - sum(rate(z[y == k]) for k in classes) / len(classes))


def run_numpy(f: np.ndarray, y: np.ndarray) -> tuple[dict, float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    scores = {"logme": numpy_logme(f, y), "hscore": numpy_hscore(f, y),
              "transrate": numpy_transrate(f, y)}
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return scores, seconds, peak + f.nbytes + y.nbytes  # the held features count too


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested state (dicts and lists)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def run_stream(f: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[dict, float, int]:
    cuda = f.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    stats = ScoreStats(f.shape[1], int(y.max()) + 1, device=f.device)
    for i in range(0, len(f), batch):
        stats.update(f[i:i + batch], y[i:i + batch])
    scores = stats.compute()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:  # torch's CPU allocator is invisible to tracemalloc: count the state instead
        peak = _tensor_bytes(stats.state_dict())
    return scores, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--c", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--table", help="also write the table to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, args.c, args.n)
    centres = rng.normal(size=(args.c, args.d))
    f = (centres[y] + 2.0 * rng.normal(size=(args.n, args.d))).astype(np.float32)
    ref, ref_s, ref_mem = run_numpy(f.astype(np.float64), y)
    ft = torch.from_numpy(f).to(args.device)
    yt = torch.from_numpy(y).to(args.device)
    run_stream(ft[:2048], yt[:2048])  # warm-up: kernels, allocator
    got, s, mem = run_stream(ft, yt)
    lines = [f"ScoreStats vs in-memory numpy, N={args.n} D={args.d} C={args.c}, "
             f"ScoreStats on {args.device}",
             f"{'':<22}{'seconds':>10}{'peak MiB':>12}",
             f"{'numpy (in memory)':<22}{ref_s:>10.2f}{ref_mem / 2**20:>12.0f}",
             f"{'ScoreStats (stream)':<22}{s:>10.2f}{mem / 2**20:>12.0f}",
             f"speed-up {ref_s / s:.1f}x, memory ratio {ref_mem / max(mem, 1):.1f}x"]
    for k in ref:
        lines.append(f"{k:<12} numpy {ref[k]:+.6g}  ScoreStats {got[k]:+.6g}  "
                     f"rel. diff {abs(ref[k] - got[k]) / max(abs(ref[k]), 1e-12):.1e}")
    text = "\n".join(lines)
    print(text)
    if args.table:
        with open(args.table, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
