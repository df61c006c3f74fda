"""MPI for minitp: the process mesh, the collectives, and a log of every byte they move.

    mesh = comm.init(tp=2)                      # 4 ranks -> 2 data-parallel replicas of 2 TP ranks
    total = comm.all_reduce(partial, mesh.tp)   # a new array: the sum over the tensor-parallel group
    with comm.log_collectives() as log:
        loss.backward()
    print(log.table())

One module per question; every public name is re-exported here, so ``comm.all_reduce`` etc. is the way
to call them:

    mesh.py         which ranks work together? ``init``, ``Mesh``, ``Group``, ``divide``
    collectives.py  what does each collective compute and cost? ``all_reduce``, ``all_gather``,
                    ``reduce_scatter``, ``broadcast``, ``split``
    exchange.py     context parallelism's exchanges: ``sendrecv`` to ring neighbours, ``all_to_all``;
                    the experts' ``all_to_all_v`` (uneven rows per rank)
    p2p.py          how does one rank hand an array to another? ``send`` (non-blocking), ``recv``
    nonblocking.py  which collectives run while the rank computes, and what makes them progress?
                    ``iall_reduce``, ``ireduce_scatter``, ``iall_gather``, ``set_progress``
    log.py          which collectives ran, moving how many bytes? ``log_collectives``, ``CollectiveLog``
    timeline.py     what did every rank do, and when? ``record_timeline`` (a Chrome trace), ``check_writable``
    checks.py       do the ranks agree? checked mode, token-id agreement (``set_checked``, ``agree``)
    failures.py     how does a job end when a rank raises or leaves? one message, within seconds
    runtime.py      how does each rank run under MPI? the abort handler, BLAS threads, and how CuPy
                    arrays reach MPI (``set_cuda_aware``, ``transport``)

Module-level state lives in exactly one of them: the meshes in ``mesh``, the open logs in ``log``, the
CUDA-aware setting in ``runtime``; read or patch it there (``comm.log._active_logs``), not here.
"""
try:
    from mpi4py import MPI  # noqa: F401 -- first, to turn "no MPI library" into one sentence
except (ImportError, RuntimeError) as error:
    raise ImportError(
        f"minitp needs mpi4py and an MPI library ({type(error).__name__}: {error}). Install one: "
        "pip install 'minitp[mpi]' (MPICH from PyPI: nothing else needed), or your system's MPI "
        "(e.g. apt install libopenmpi-dev) and then pip install --no-binary mpi4py mpi4py") from None

from minitp.comm.checks import agree, agree_on_ids, checked, set_checked
from minitp.comm.collectives import all_gather, all_reduce, broadcast, reduce_scatter, split
from minitp.comm.exchange import all_to_all, all_to_all_v, sendrecv
from minitp.comm.log import CollectiveLog, CollectiveRecord, log_collectives
from minitp.comm.mesh import Group, Mesh, divide, init
from minitp.comm.failures import install_abort_handler
from minitp.comm.nonblocking import Pending, iall_gather, iall_reduce, ireduce_scatter, set_progress
from minitp.comm.p2p import PendingSend, recv, send, wait_all
from minitp.comm.runtime import set_cuda_aware, transport
from minitp.comm.timeline import check_writable, record_timeline

__all__ = [
    "init", "Mesh", "Group", "divide",
    "all_reduce", "all_gather", "reduce_scatter", "broadcast", "split", "sendrecv", "all_to_all", "all_to_all_v",
    "send", "recv", "wait_all", "PendingSend",
    "iall_reduce", "ireduce_scatter", "iall_gather", "Pending", "set_progress",
    "record_timeline", "check_writable",
    "log_collectives", "CollectiveLog", "CollectiveRecord",
    "install_abort_handler", "set_cuda_aware", "transport", "agree", "agree_on_ids", "checked", "set_checked",
]

install_abort_handler()  # from the first import: a rank that fails before init() must not hang the others
