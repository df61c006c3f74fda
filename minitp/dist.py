"""MPI for minitp: the process mesh, the collectives, and a log of every byte they move.

    mesh = dist.init(tp=2)                      # 4 ranks -> 2 data-parallel replicas of 2 TP ranks
    total = dist.all_reduce(partial, mesh.tp)   # a new array: the sum over the tensor-parallel group
    with dist.log_collectives() as log:
        loss.backward()
    print(log.table())

**The mesh.** ``world`` ranks are laid out as a (dp, tp) grid, tensor-parallel ranks contiguous:
``rank = dp_rank * tp + tp_rank``. Ranks that share a ``dp_rank`` form one tensor-parallel group (they
hold the shards of one model replica, and talk on every layer, so they are neighbours: on one node when
ranks are placed node by node); ranks that share a ``tp_rank`` form a data-parallel group.

**The collectives** take an array (numpy or CuPy) and a ``Group`` and return a new array; they never write
into their input. They use mpi4py's buffer methods (``Allreduce``, ``Allgather``, ...), which hand MPI the
array's memory with its MPI datatype -- no pickling. Arrays must have the same shape and dtype on every
rank of the group. On a group of one rank there is nothing to communicate and the input itself is
returned (no copy); ``split`` returns a view. So treat results as read-only, as every op in minitp does
(the autograd engine never writes into an array in place).

**CuPy arrays** reach MPI one of two ways, because no MPI query reliably tells whether the library can
read GPU memory: by default they are staged through host memory (device -> host, MPI, host -> device);
with ``MINITP_CUDA_AWARE_MPI=1`` in the environment (or ``set_cuda_aware(True)``) the device buffers are
passed to MPI directly, after the current stream has finished writing them. ``transport()`` says which.

**The log.** Every collective run inside ``with log_collectives() as log:`` appends a ``CollectiveRecord``:
the op, the group, the shape and dtype of the full buffer S (the gathered result of an all-gather, the
input of a reduce-scatter), its payload bytes, the bytes each rank sends in a ring algorithm, and a tag
naming the operator that called it ("f backward"). Outside such a block the log costs one list test.

**Failures.** ``init()`` installs ``install_abort_handler()``: an unhandled exception on any rank prints
that rank's traceback and aborts the whole job, instead of leaving the other ranks waiting in a
collective forever. Bad configurations (sizes that do not divide) raise the same ``ValueError`` on every
rank before any communication, because every rank checks the same numbers.
"""
import contextlib
import os
import sys
import traceback
from dataclasses import dataclass

import numpy
from mpi4py import MPI

from minitp import backend

# -- sizes that must divide -------------------------------------------------------------------------


def divide(total, parts, what):
    """``total // parts``, or a ``ValueError`` naming ``what`` when ``parts`` does not divide ``total``.

    Every rank computes this from the same configuration, so every rank raises the same error before
    any collective: no rank is left waiting for a partner that has already stopped.
    """
    if parts <= 0 or total % parts:
        raise ValueError(f"{what}={total} is not divisible by {parts}: choose sizes where it divides")
    return total // parts


# -- groups and the mesh ----------------------------------------------------------------------------


class Group:
    """A set of ranks that communicate: an MPI communicator with a name (``"world"``, ``"tp"``, ``"dp"``).

    ``rank`` is this process's position in the group (0 .. size-1); ``ranks`` lists the members by their
    rank in ``MPI.COMM_WORLD``, in group order.
    """

    def __init__(self, comm, name):
        self.comm = comm
        self.name = name
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        # Translating ranks between MPI groups is local: no communication.
        members, everyone = comm.Get_group(), MPI.COMM_WORLD.Get_group()
        self.ranks = tuple(members.Translate_ranks(list(range(self.size)), everyone))
        members.Free()
        everyone.Free()

    def __repr__(self):
        return f"Group({self.name!r}, rank {self.rank} of {self.size}, world ranks {list(self.ranks)})"


class Mesh:
    """The world's ranks as a (dp, tp) grid: ``world``, ``tp`` and ``dp`` Groups.

    ``tp_size`` ranks with consecutive world ranks share one model replica's shards; ``dp_size`` defaults
    to ``world size // tp_size``. ``dp_size * tp_size`` must equal the world size, else ``ValueError``
    (on every rank: each computes it from the same numbers).
    """

    def __init__(self, tp_size=1, dp_size=None):
        world = MPI.COMM_WORLD
        world_size = world.Get_size()
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, not {tp_size!r}")
        if dp_size is None:
            dp_size = world_size // tp_size
        if not isinstance(dp_size, int) or dp_size < 1 or dp_size * tp_size != world_size:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(
                f"dp_size × tp_size must equal the number of ranks: {dp_size} × {tp_size} ≠ {world_size}. "
                f"Launch a multiple of tp_size ranks (mpirun -n {tp_size}, {2 * tp_size}, ...) "
                f"or choose tp_size among {divisors}")
        self.tp_size, self.dp_size = tp_size, dp_size
        rank = world.Get_rank()
        self.dp_rank, self.tp_rank = divmod(rank, tp_size)  # rank = dp_rank * tp + tp_rank
        self.world = Group(world, "world")
        # Split: ranks passing the same colour form one communicator, ordered by key.
        self.tp = Group(world.Split(color=self.dp_rank, key=self.tp_rank), "tp")
        self.dp = Group(world.Split(color=self.tp_rank, key=self.dp_rank), "dp")

    @property
    def rank(self):
        return self.world.rank

    def __repr__(self):
        return (f"Mesh(world {self.world.size} = dp {self.dp_size} × tp {self.tp_size}; "
                f"rank {self.rank} is tp_rank {self.tp_rank}, dp_rank {self.dp_rank})")


_meshes = {}  # (tp, dp) -> Mesh: init() reuses communicators rather than splitting new ones each call
_current_mesh = None


def init(tp=1, dp=None):
    """The process mesh for ``tp`` × ``dp`` ranks, ready to use: call it first, on every rank.

    Also installs the abort handler (an exception on one rank ends the job) and, when ranks on this
    node share its cores, limits each rank's BLAS to its share of them. The mesh becomes
    ``current_mesh()``, whose ``tp`` group the parallel operators use when given no group. Calling it
    again with the same sizes returns the same mesh.
    """
    global _current_mesh
    install_abort_handler()
    key = (tp, dp)
    if key not in _meshes:
        _meshes[key] = Mesh(tp, dp)
        _limit_blas_threads()
    _current_mesh = _meshes[key]
    return _current_mesh


def current_mesh():
    """The mesh made by the latest ``init()``; ``None`` before it."""
    return _current_mesh


def tensor_parallel_group(group=None):
    """``group``, or the tensor-parallel group of ``current_mesh()`` when ``group`` is ``None``."""
    if group is not None:
        return group
    if _current_mesh is None:
        raise RuntimeError("no group given and no mesh: call minitp.dist.init(tp=...) first, or pass group=")
    return _current_mesh.tp


_blas_threads_limited = False


def _limit_blas_threads():
    """Give each rank its share of this node's cores for BLAS.

    numpy's BLAS starts one thread per core in every process; with r ranks on c cores that is r×c
    threads fighting for c cores, and the matmuls slow down instead of speeding up. So each rank gets
    max(1, c // r) threads (1 when ranks outnumber cores). A limit the user already set lower (e.g.
    OMP_NUM_THREADS=1) is kept.
    """
    global _blas_threads_limited
    if _blas_threads_limited:
        return
    _blas_threads_limited = True
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks that share this node's memory
    ranks_on_node = node.Get_size()
    node.Free()
    if ranks_on_node == 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // ranks_on_node)
    from threadpoolctl import threadpool_info, threadpool_limits
    if any(pool["num_threads"] > share for pool in threadpool_info() if pool["user_api"] == "blas"):
        threadpool_limits(limits=share, user_api="blas")


# -- an exception on one rank ends the job ---------------------------------------------------------


def install_abort_handler():
    """On an unhandled exception, print ``[rank r]`` and the traceback to stderr, then abort every rank.

    Without it, one rank dies while the others wait forever in their next collective, and mpirun hangs
    with no message. With one rank, Python's usual handling is kept. Installed by ``init()``; safe to
    call more than once. (``python -m mpi4py script.py`` does the same for scripts that skip ``init``.)
    """
    if getattr(sys.excepthook, "minitp_abort", False):
        return
    previous = sys.excepthook

    def abort_on_exception(kind, value, trace):
        world = MPI.COMM_WORLD
        if world.Get_size() == 1:
            previous(kind, value, trace)
            return
        text = "".join(traceback.format_exception(kind, value, trace)).rstrip("\n")
        prefix = f"[rank {world.Get_rank()}] "
        # every line prefixed: the ranks' outputs may interleave on a shared terminal
        sys.stdout.flush()
        sys.stderr.write("".join(prefix + line + "\n" for line in text.split("\n")))
        sys.stderr.write(f"{prefix}aborting all {world.Get_size()} ranks\n")
        sys.stderr.flush()
        world.Abort(1)

    abort_on_exception.minitp_abort = True
    sys.excepthook = abort_on_exception


# -- how arrays reach MPI ---------------------------------------------------------------------------

_cuda_aware = os.environ.get("MINITP_CUDA_AWARE_MPI", "0") == "1"


def set_cuda_aware(enabled=True):
    """Pass CuPy device buffers straight to MPI (``True``) or stage them through the host (``False``).

    Only say ``True`` if your MPI was built with CUDA support (Open MPI with UCX/CUDA, MVAPICH2-GDR,
    Cray MPICH with GPU support...): a plain MPI given a device pointer crashes.
    """
    global _cuda_aware
    _cuda_aware = bool(enabled)


def transport():
    """A one-line description of how arrays reach MPI, for tutorial banners."""
    if backend.device() == "cpu":
        return "numpy buffers"
    return "CuPy device buffers (CUDA-aware MPI)" if _cuda_aware else "CuPy via host staging"


def _for_mpi(array):
    """``array`` (C-contiguous) in memory MPI can read: numpy as is; CuPy on the device when MPI is
    CUDA-aware, else copied to the host. Contiguity first, so a CuPy copy runs on the GPU."""
    xp = backend.array_module(array)
    array = xp.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes a 0-d array 1-d
    if xp is numpy:
        return array
    if _cuda_aware:
        backend.synchronize()  # MPI reads the memory directly: the kernels writing it must be done
        return array
    return backend.to_host(array)


def _like(result, original):
    """``result`` moved back to where ``original`` lives (the host-staging return trip)."""
    if isinstance(result, numpy.ndarray) and not isinstance(original, numpy.ndarray):
        return backend.array_module(original).asarray(result)
    return result


def _buffer(array):
    """An mpi4py buffer specification: the memory and its MPI datatype, read from the numpy dtype."""
    code = numpy.dtype(array.dtype).char
    fromcode = getattr(MPI.Datatype, "fromcode", None)  # mpi4py >= 4; older versions keep a dict
    datatype = fromcode(code) if fromcode is not None else MPI._typedict[code]
    return [array, datatype]


def _axis(array, axis):
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis} out of range for an array of shape {array.shape}")
    return axis % array.ndim


# -- the collectives --------------------------------------------------------------------------------


_REDUCE_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


def all_reduce(x, group, tag="", op="sum"):
    """The elementwise sum (``op="max"``: maximum) of ``x`` over the ranks of ``group``, on every rank.

    Ring cost: 2(n-1)/n · S bytes sent per rank (a reduce-scatter then an all-gather, each passing n-1
    blocks of S/n around the ring).
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce op must be one of {sorted(_REDUCE_OPS)}, not {op!r}")
    n = group.size
    if _active_logs:
        _record("all_reduce", group, x.shape, x.dtype, x.nbytes, 2 * (n - 1) * x.nbytes / n, tag)
    if n == 1:
        return x
    send = _for_mpi(x)
    total = backend.array_module(send).empty_like(send)
    group.comm.Allreduce(_buffer(send), _buffer(total), op=_REDUCE_OPS[op])
    return _like(total, x)


def all_gather(x, group, axis=0, tag=""):
    """The ranks' arrays ``x`` concatenated along ``axis`` in rank order, on every rank.

    Each rank sends its whole ``x`` (one contiguous block whatever the axis) and receives the n blocks
    rank-major, shape (n, *x.shape). Along axis 0 that buffer already is the concatenation (no copy);
    along another axis the rank index must move next to that axis, one copy. Ring cost: (n-1)/n · S
    bytes sent per rank, S the gathered array.
    """
    n = group.size
    axis = _axis(x, axis)
    gathered_shape = x.shape[:axis] + (x.shape[axis] * n,) + x.shape[axis + 1:]
    if _active_logs:
        _record("all_gather", group, gathered_shape, x.dtype, n * x.nbytes, (n - 1) * x.nbytes, tag)
    if n == 1:
        return x
    send = _for_mpi(x)
    xp = backend.array_module(send)
    blocks = xp.empty((n,) + send.shape, dtype=send.dtype)
    group.comm.Allgather(_buffer(send), _buffer(blocks))
    if axis == 0:
        gathered = blocks.reshape(gathered_shape)
    else:
        # (n, ..., k, ...) -> (..., n, k, ...) -> (..., n*k, ...): rank r's block lands at [r*k, (r+1)*k)
        gathered = xp.ascontiguousarray(xp.moveaxis(blocks, 0, axis)).reshape(gathered_shape)
    return _like(gathered, x)


def reduce_scatter(x, group, axis=0, tag=""):
    """The sum of ``x`` over the ranks, of which rank r keeps block r along ``axis``.

    ``x.shape[axis]`` must be divisible by the group size (``ValueError`` otherwise, on every rank).
    MPI's Reduce_scatter_block wants block r to be the r-th contiguous chunk of the send buffer: true
    along axis 0 of a C-contiguous array; for another axis the blocks are moved to the front first (one
    copy). Ring cost: (n-1)/n · S bytes sent per rank, S the input (pre-scatter) array.
    """
    n = group.size
    axis = _axis(x, axis)
    block = divide(x.shape[axis], n, f"reduce_scatter: the length of axis {axis} of an array of shape {x.shape}")
    if _active_logs:
        _record("reduce_scatter", group, x.shape, x.dtype, x.nbytes, (n - 1) * x.nbytes / n, tag)
    if n == 1:
        return x
    xp = backend.array_module(x)
    block_shape = x.shape[:axis] + (block,) + x.shape[axis + 1:]
    rank_major = x
    if axis != 0:
        # (..., n*k, ...) -> (..., n, k, ...) -> (n, ..., k, ...): each rank's block contiguous (a copy)
        rank_major = xp.moveaxis(x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:]), axis, 0)
    send = _for_mpi(rank_major)
    mine = backend.array_module(send).empty(block_shape, dtype=send.dtype)
    group.comm.Reduce_scatter_block(_buffer(send), _buffer(mine), op=MPI.SUM)
    return _like(mine, x)


def broadcast(x, group, root=0, tag=""):
    """Rank ``root``'s ``x`` on every rank (the others pass an array of the same shape and dtype, whose
    values are ignored).

    Logged ring cost: (n-1)/n · S bytes per rank -- what each rank passes on in the all-gather phase of
    the scatter + ring all-gather broadcast that MPI uses for large buffers (the root also sends
    (n-1)/n · S in the scatter phase, not counted). Small buffers go down a tree instead.
    """
    n = group.size
    if _active_logs:
        _record("broadcast", group, x.shape, x.dtype, x.nbytes, (n - 1) * x.nbytes / n, tag)
    if n == 1:
        return x
    values = _for_mpi(x)
    if backend.data_ptr(values) == backend.data_ptr(x):
        values = values.copy()  # Bcast writes in place; the caller's x must stay as it was
    group.comm.Bcast(_buffer(values), root=root)
    return _like(values, x)


def split(x, group, axis):
    """This rank's block of ``x`` along ``axis`` (a view; no communication, not logged).

    Block r is ``[r*k, (r+1)*k)`` with k = length / group size: the inverse of ``all_gather``.
    """
    axis = _axis(x, axis)
    block = divide(x.shape[axis], group.size, f"split: the length of axis {axis} of an array of shape {x.shape}")
    index = [slice(None)] * x.ndim
    index[axis] = slice(group.rank * block, (group.rank + 1) * block)
    return x[tuple(index)]


# -- the collective log -----------------------------------------------------------------------------


@dataclass
class CollectiveRecord:
    """One collective call, as seen by this rank."""
    op: str
    """``"all_reduce"``, ``"all_gather"``, ``"reduce_scatter"`` or ``"broadcast"``"""
    group: str
    """the group's name: ``"world"``, ``"tp"``, ``"dp"``"""
    group_size: int
    shape: tuple
    """the shape of the full buffer S: the input of an all-reduce, reduce-scatter or broadcast; the
    gathered output of an all-gather"""
    dtype: str
    payload_bytes: int
    """S in bytes"""
    ring_bytes: float
    """bytes this rank sends in a ring algorithm: 2(n-1)/n·S for all-reduce, (n-1)/n·S for the others"""
    tag: str
    """which operator called it, e.g. ``"f backward"``"""


class CollectiveLog:
    """The collectives recorded inside one ``log_collectives()`` block, in call order (list-like)."""

    def __init__(self):
        self.records = []

    def __len__(self):
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def select(self, op=None, tag=None):
        """The records of collective ``op`` (any if ``None``) whose tag contains ``tag``."""
        return [r for r in self.records if (op is None or r.op == op) and (tag is None or tag in r.tag)]

    def count(self, op=None, tag=None):
        return len(self.select(op, tag))

    def total_payload_bytes(self, op=None, tag=None):
        return sum(r.payload_bytes for r in self.select(op, tag))

    def total_ring_bytes(self, op=None, tag=None):
        return sum(r.ring_bytes for r in self.select(op, tag))

    def table(self):
        """An aligned table, one collective per line, with the totals underneath."""
        header = ("#", "op", "group", "n", "shape", "dtype", "payload B", "ring B/rank", "tag")
        rows = [(str(i), r.op, r.group, str(r.group_size), "×".join(map(str, r.shape)) or "scalar", r.dtype,
                 f"{r.payload_bytes:,}", _bytes(r.ring_bytes), r.tag) for i, r in enumerate(self.records)]
        rows.append(("", "total", "", "", "", "", f"{self.total_payload_bytes():,}",
                     _bytes(self.total_ring_bytes()), f"{len(self.records)} collective{'' if len(self.records) == 1 else 's'}"))
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        numeric = {0, 3, 6, 7}  # right-aligned columns

        def line(row):
            return "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        return "\n".join([line(header)] + [line(row) for row in rows])

    def __str__(self):
        return self.table()


def _bytes(value):
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


_active_logs = []


@contextlib.contextmanager
def log_collectives():
    """Record every collective run inside the block::

        with dist.log_collectives() as log:
            y = layer(x)
        assert log.count("all_reduce") == 1

    Blocks may nest: each log sees the collectives run while it is open.
    """
    log = CollectiveLog()
    _active_logs.append(log)
    try:
        yield log
    finally:
        _active_logs.remove(log)


def _record(op, group, shape, dtype, payload_bytes, ring_bytes, tag):
    record = CollectiveRecord(op, group.name, group.size, tuple(shape), str(numpy.dtype(dtype)),
                              int(payload_bytes), ring_bytes, tag)
    for log in _active_logs:
        log.records.append(record)
