"""Prints one line per rank, "cores ranks_on_node threads": each rank's BLAS threads after comm.init()
(tests/test_dist.py::test_init_shares_the_cores_between_the_ranks_blas_threads)."""
import os

from mpi4py import MPI
from threadpoolctl import threadpool_info

from minitp import comm

comm.init()
node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
threads = max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
lines = MPI.COMM_WORLD.gather(f"{len(os.sched_getaffinity(0))} {node.Get_size()} {threads}")
if MPI.COMM_WORLD.rank == 0:
    print("\n".join(lines), flush=True)  # from one rank: the ranks' lines cannot interleave
