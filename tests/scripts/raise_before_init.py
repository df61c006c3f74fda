"""Rank 1 raises after importing minitp but before comm.init, while rank 0 goes on into init and a
collective (tests/test_dist.py). The abort handler is installed on import, so the job still ends."""
import numpy
from mpi4py import MPI

from minitp import comm

if MPI.COMM_WORLD.Get_rank() == 1:
    raise RuntimeError("rank 1 fails before comm.init")
mesh = comm.init()
comm.all_reduce(numpy.ones(3), mesh.world)
print("unreachable")
