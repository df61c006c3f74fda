"""minitp.allocator: a fresh process reuses the pages of a freed block, whatever its size (the per-call
receive buffers of the collectives, a step's activations), instead of having the kernel map and zero
them again. Each case runs in a new Python process, where glibc's settings are still untouched."""
import os
import subprocess
import sys

import pytest

# Allocate and free a 64 MiB array (over glibc's 32 MiB ceiling for M_MMAP_THRESHOLD), then count the page
# faults of filling a second one of the same size.
SCRIPT = """
import resource, numpy, minitp.allocator as allocator
numpy.ones(2 ** 23); before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
numpy.ones(2 ** 23); print(allocator.KEPT, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(environment):
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, env=environment)
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
def test_a_freed_64_mib_block_is_reused_without_page_faults_unless_opted_out():
    base = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    kept, faults = _faults(base)
    assert kept and faults < 8, f"{faults} page faults filling a reused 64 MiB block"
    kept, faults = _faults({**base, "MINITP_MALLOC": "default"})
    assert not kept and faults >= 16, f"glibc's default should map the block afresh, yet {faults} faults"
