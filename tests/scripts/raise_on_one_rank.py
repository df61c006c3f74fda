"""Rank 2 raises while the other ranks wait for it in an all-reduce (tests/test_dist.py::test_abort).

Without minitp's abort handler this job would hang forever; with it, rank 2 prints its traceback and
MPI_Abort ends every rank. Run with 4 ranks: mpiexec -n 4 python tests/scripts/raise_on_one_rank.py
"""
import numpy

from minitp import comm

mesh = comm.init()
if mesh.rank == 2:
    raise RuntimeError("rank 2 fails on purpose")
comm.all_reduce(numpy.ones(3), mesh.world)  # waits for rank 2, which never comes
print(f"rank {mesh.rank}: unreachable, the all-reduce needed rank 2")
