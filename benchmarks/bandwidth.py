"""Memory read bandwidth with N threads, for the bandwidth-limit figure of decode (weight bytes per token x tokens/s).

    python benchmarks/bandwidth.py [THREADS=2] [MB=1024]

Each thread sums its own slice of one large array (numpy releases the GIL in the reduction), several times;
the best pass counts, as a decode step is a best-effort stream of the weights too.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np


def read_bandwidth(threads: int = 2, megabytes: int = 1024, passes: int = 5) -> float:
    """GB/s read by `threads` threads together."""
    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(passes):
        workers = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


if __name__ == "__main__":
    threads, megabytes = (int(a) for a in (sys.argv[1:] + ["2", "1024"][len(sys.argv) - 1:])[:2])
    print(f"{read_bandwidth(threads, megabytes):.1f} GB/s read with {threads} threads")
