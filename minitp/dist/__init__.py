"""MPI for minitp: the process mesh, the collectives, and a log of every byte they move.

    mesh = dist.init(tp=2)                      # 4 ranks -> 2 data-parallel replicas of 2 TP ranks
    total = dist.all_reduce(partial, mesh.tp)   # a new array: the sum over the tensor-parallel group
    with dist.log_collectives() as log:
        loss.backward()
    print(log.table())

One module per question; every public name is re-exported here, so ``dist.all_reduce`` etc. is the way
to call them:

    mesh.py         which ranks work together? ``init``, ``Mesh``, ``Group``, ``divide``
    collectives.py  what does each collective compute and cost? ``all_reduce``, ``all_gather``,
                    ``reduce_scatter``, ``broadcast``, ``split``
    nonblocking.py  which collectives run while the rank computes, and what makes them progress?
                    ``iall_reduce``, ``ireduce_scatter``, ``iall_gather``, ``set_progress``
    log.py          which collectives ran, moving how many bytes? ``log_collectives``, ``CollectiveLog``
    timeline.py     what did every rank do, and when? ``record_timeline`` (a Chrome trace), ``check_writable``
    runtime.py      how does each rank run under MPI? the abort handler, BLAS threads, and how CuPy
                    arrays reach MPI (``set_cuda_aware``, ``transport``)

Module-level state lives in exactly one of them: the meshes in ``mesh``, the open logs in ``log``, the
CUDA-aware setting in ``runtime``; read or patch it there (``dist.log._active_logs``), not here.
"""
from minitp.dist.collectives import all_gather, all_reduce, broadcast, reduce_scatter, split
from minitp.dist.log import CollectiveLog, CollectiveRecord, log_collectives
from minitp.dist.mesh import Group, Mesh, divide, init
from minitp.dist.nonblocking import Pending, iall_gather, iall_reduce, ireduce_scatter, set_progress
from minitp.dist.runtime import install_abort_handler, set_cuda_aware, transport
from minitp.dist.timeline import check_writable, record_timeline

__all__ = [
    "init", "Mesh", "Group", "divide",
    "all_reduce", "all_gather", "reduce_scatter", "broadcast", "split",
    "iall_reduce", "ireduce_scatter", "iall_gather", "Pending", "set_progress",
    "record_timeline", "check_writable",
    "log_collectives", "CollectiveLog", "CollectiveRecord",
    "install_abort_handler", "set_cuda_aware", "transport",
]
