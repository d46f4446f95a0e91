"""What the training stages share (train.py): the allocator setting that keeps freed memory for reuse."""
import subprocess
import sys

import pytest

STEPS = """
import resource, sys
import torch
from instructgpt_cli.distributed import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(30):  # a training step's worth of memory: 64 MB allocated, written, freed
    f0 = faults()
    t = torch.empty(16 << 20)
    t.fill_(1.0)
    del t
    counts.append(faults() - f0)
print(sorted(counts[-5:])[2])  # the median of the last 5 steps: one step another process's load disturbs is not it
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults():
    default = page_faults("default")
    if default < 1000:
        pytest.skip(f"this kernel maps the freed 64 MB back in {default} faults (huge pages): nothing to save")
    # glibc unmaps a freed 64 MB block and the next step faults its 16384 pages in again; kept, the
    # steps after the first few reuse the same memory (a step's median over the last five: under a loaded host a
    # single step was seen faulting its block in again, 1 run in 4)
    # On the 2026-12-07 hosts (kernel 6.18) a kept process faults the block in again for its first steps (2 to 7
    # of them, longer under load: the cause was not found), then never: 30 steps, the median of the last five;
    # the CI of 469e5ab, beside three other jobs, saw 10 steps end inside that transient in all five processes.
    # The setting must work in one of five processes, and a run without it (as `default`) never does.
    assert min(page_faults("keep") for _ in range(5)) < default / 100
