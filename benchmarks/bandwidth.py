"""Memory read bandwidth with N threads, for the bandwidth-limit figure of decode (weight bytes per token x tokens/s).

    python benchmarks/bandwidth.py [THREADS=2] [MB=1024]

The measurement itself is edge/budget.py's read_bandwidth, which `edge bench --profile-ops` reports beside its
per-token budget.
"""
from __future__ import annotations

import sys

from edge.budget import read_bandwidth

if __name__ == "__main__":
    threads, megabytes = (int(a) for a in (sys.argv[1:] + ["2", "1024"][len(sys.argv) - 1:])[:2])
    print(f"{read_bandwidth(threads, megabytes):.1f} GB/s read with {threads} threads")
