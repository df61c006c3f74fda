"""Rank 1 leaves with sys.exit(STATUS) while the others wait for it in an all-reduce
(tests/test_dist.py::test_a_rank_that_leaves_ends_the_job). Without minitp's exit handshake they would
wait forever. Run: mpiexec -n 2 python tests/scripts/exit_on_one_rank.py STATUS
"""
import sys

import numpy

from minitp import comm

mesh = comm.init()
if mesh.rank == 1:
    sys.exit(int(sys.argv[1]))
comm.all_reduce(numpy.ones(3), mesh.world)  # waits for rank 1, which has left
print(f"rank {mesh.rank}: unreachable, the all-reduce needed rank 1")
