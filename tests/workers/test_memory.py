"""Allocator tuning: applied once on glibc; aggregation then reuses freed memory instead of re-faulting it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.services  # measures page faults in a subprocess


def _minor_faults_per_module(tune: bool) -> float:
    """Minor page faults of an svd aggregation of llama-sized modules, after a warm-up, in a fresh process."""
    code = textwrap.dedent(f"""
        import math, resource, torch
        from chorus_mq.aggregation import ClientUpdate, aggregate_module
        from chorus_mq.workers.memory import retain_freed_memory
        if {tune}:
            assert retain_freed_memory() is True and retain_freed_memory() is True
        gen = torch.Generator().manual_seed(0)
        shapes = [(8192, 3072), (3072, 3072), (1024, 3072), (3072, 8192)]
        pools = [[ClientUpdate(A=torch.randn(16, d_in, generator=gen) / math.sqrt(d_in),
                               B=torch.randn(d_out, 16, generator=gen) * 1e-2, scaling=2.0, weight=1.0 + i)
                  for i in range(10)] for d_out, d_in in shapes]
        for pool in pools:
            aggregate_module(pool, "svd")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            for pool in pools:
                aggregate_module(pool, "svd")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (3 * len(pools)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_aggregation_reuses_freed_memory_once_tuned():
    # glibc's defaults vary from run to run (heap layout): from ~10 to ~2400 faults per module
    # here, i.e. up to 10 MB of temporaries returned to the kernel and faulted in again.
    # Tuned, the same blocks are reused every time.
    assert max(_minor_faults_per_module(True) for _ in range(3)) < 200
