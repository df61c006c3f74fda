"""Every rank raises the same configuration error (a size tp does not divide): the job should print the
traceback once, not once per rank (tests/test_dist.py)."""
from minitp import comm
from minitp.parallel import ParallelMLP

mesh = comm.init(tp=comm.Mesh().world.size)
ParallelMLP(4, 2 * mesh.tp.size + 1, group=mesh.tp)  # ffn_hidden not divisible by tp: ValueError everywhere
