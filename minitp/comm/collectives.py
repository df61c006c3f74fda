"""What does each collective compute, and what does it cost? all_reduce, all_gather, reduce_scatter,
broadcast, and split (all_gather's inverse, no communication).

The collectives take an array (numpy or CuPy) and a ``Group`` and return a new array; they never write
into their input unless asked to by name (``all_reduce(x, group, out=x)`` reduces a buffer in place).
They use mpi4py's buffer methods (``Allreduce``, ``Allgather``, ...), which hand MPI the array's memory
with its MPI datatype -- no pickling. On a group of one rank there is nothing to communicate and the
input itself is returned (no copy); ``split`` returns a view. So treat results as read-only, as every op
in minitp does (the autograd engine writes in place only into arrays it made).

**What is checked.** Every rank of the group must call the same collective, in the same order, with an
array of the same shape and dtype. MPI trusts that: an all-gather of uneven shards reads uninitialised
memory, ranks that pass different dtypes reduce bytes of one type as another (garbage, NaN), and two
ranks that call different collectives hang or mix their data -- no error. Two kinds of checks:

- always on, local (nothing is sent; the same ``ValueError`` on every rank fed the same kind of input,
  before any communication): what one rank can see alone -- an axis length that the group size does
  not divide (``reduce_scatter``, ``split``, the non-blocking ``ireduce_scatter``), an axis out of
  range, an unknown reduction ``op``, an ``out`` of another shape or dtype than the result;
- only in **checked mode** (``comm.init(checked=True)``, ``checks.py``): what no rank can see alone --
  a shape that differs across the ranks (uneven all-gather shards, a reduce-scatter or all-reduce of
  another length on one rank, a broadcast buffer of another shape), a dtype that differs across them,
  and ranks that call different collectives at one point (e.g. one ``all_reduce``, another
  ``all_gather``, or the blocking and the non-blocking twin). One small allgather of (call, shape,
  dtype) per collective, ~7-23 µs, before it (measured: see ``checks.py``); a ``ValueError`` on every
  rank naming what each rank passed.

Not caught even in checked mode: values that should agree and do not (a "replicated" tensor that
differs across ranks -- except token ids, always checked by the layers, and a sequence-parallel layer
fed the same array on every rank, caught by checked mode in ``checks.not_replicated``).

Each docstring gives the ring cost that the collective log (``log.py``) records; how a CuPy array
reaches MPI (host staging or CUDA-aware) is ``runtime.py``'s business. While a trace is recorded
(``minitp.trace``), each collective over more than one rank is one "comm" span with its bytes.
"""
import numpy
from mpi4py import MPI

from minitp import backend, trace
from minitp.comm import checks, log
from minitp.comm.mesh import divide
from minitp.comm.runtime import _for_mpi, _like


_DATATYPES = {}  # numpy dtype -> MPI datatype (or _Words), read once per dtype (the lookup costs a microsecond)


class _Words:
    """A 2-byte float that this MPI has no datatype for -- bfloat16 everywhere (no MPI defines one), float16
    where the MPI lacks MPI_FLOAT16 (Open MPI 4.1 may) -- crosses as 2-byte words (``MPI.UINT16_T``): the
    bytes on the wire stay 2 per element, as the collective log records. Reductions cannot add words, so
    they use a user-defined commutative MPI op per (dtype, op), created once on first use, that views
    the two buffers as ``dtype`` and adds (or takes the maximum) with numpy: one rounding per addition,
    as MPI's own float16 sum does. Only the ops of ``_REDUCE_OPS`` exist (sum, max)."""

    datatype = MPI.UINT16_T

    def __init__(self, dtype):
        self.dtype, self._ops = numpy.dtype(dtype), {}

    def op(self, name):
        if name not in self._ops:
            dtype, ufunc = self.dtype, _UFUNCS[name]

            def reduce(inbuf, inoutbuf, datatype):  # MPI: inoutbuf = inbuf (op) inoutbuf, elementwise
                into = numpy.frombuffer(inoutbuf, dtype=dtype)
                ufunc(numpy.frombuffer(inbuf, dtype=dtype), into, out=into)

            self._ops[name] = MPI.Op.Create(reduce, commute=True)
        return self._ops[name]


_UFUNCS = {"sum": numpy.add, "max": numpy.maximum}


def _datatype(dtype):
    """The MPI datatype of a numpy dtype, or a ``_Words`` for a 2-byte float the MPI has no type for."""
    datatype = _DATATYPES.get(dtype)
    if datatype is None:
        dtype = numpy.dtype(dtype)
        code = dtype.char
        fromcode = getattr(MPI.Datatype, "fromcode", None)  # mpi4py >= 4; older versions keep a dict
        try:
            datatype = fromcode(code) if fromcode is not None else MPI._typedict[code]
            if datatype == MPI.DATATYPE_NULL:  # a type the MPI library left undefined
                raise ValueError(code)
        except (KeyError, ValueError):
            if not (dtype.itemsize == 2 and (dtype.kind == "f" or dtype.name == "bfloat16")):
                raise ValueError(f"MPI has no datatype for {dtype} (code {code!r})") from None
            datatype = _Words(dtype)
        _DATATYPES[dtype] = datatype
    return datatype


def _buffer(array):
    """An mpi4py buffer specification: the memory and its MPI datatype, read from the numpy dtype.
    (Naming the datatype is also faster than letting mpi4py discover it from the buffer each call.)
    A 2-byte float without an MPI datatype (``_Words``) is handed over as 2-byte words: a numpy array as
    its uint16 view (numpy cannot export bfloat16 through the buffer protocol), a device array as is."""
    datatype = _datatype(array.dtype)
    if type(datatype) is _Words:
        return [array.view(numpy.uint16) if type(array) is numpy.ndarray else array, datatype.datatype]
    return [array, datatype]


def _reduce_op(name, dtype):
    """The MPI op of ``name`` ("sum", "max") for arrays of ``dtype``: MPI's own, or a ``_Words``' user op."""
    datatype = _datatype(dtype)
    return datatype.op(name) if type(datatype) is _Words else _REDUCE_OPS[name]


def _for_reduction(array):
    """``_for_mpi`` for a reduction's buffer: a ``_Words`` dtype is summed by numpy code inside MPI's
    user op, which cannot read device memory, so a CuPy array of one is always staged through the host."""
    array = _for_mpi(array)
    if type(array) is not numpy.ndarray and type(_datatype(array.dtype)) is _Words:
        return backend.to_host(array)
    return array


def _end_nothing():
    pass


def _begin(op, group, x, tag, shape, payload_bytes, ring_bytes, uneven_axis=None):
    """What every collective does before MPI runs it: checked mode's test that the ranks pass the same
    shape and dtype (``checks.py``; ``uneven_axis``: except along that axis, as ``all_to_all_v``'s rows),
    its record in the open collective logs (``shape``: the logged, full array), and the start of its
    "comm" span when a trace is recorded. Returns the function that ends the span, to call once MPI has
    returned. With none of the three on -- the default -- this is three tests of a flag: a collective's
    fixed cost is a few microseconds of Python over MPI's own. (``exchange.py``'s all-to-alls use it too.)"""
    if not (checks.checked() or log._active_logs or trace.recording is not None):
        return _end_nothing  # the default: nothing watches
    if group.size > 1 and checks.checked():
        checks.agree_on_array(group, op, tag, x, axis=uneven_axis)
    if log._active_logs:
        log._record(op, group, shape, x.dtype, payload_bytes, ring_bytes, tag)
    if trace.recording is None:
        return _end_nothing
    started = trace.now()

    def end():
        trace.complete(op, "comm", started, dict(group=group.name, bytes=int(payload_bytes),
                                                 ring_bytes=ring_bytes, tag=tag))
    return end


def _axis(array, axis):
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis} out of range for an array of shape {array.shape}")
    return axis % array.ndim


# -- the collectives --------------------------------------------------------------------------------


_REDUCE_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


def all_reduce(x, group, tag="", op="sum", out=None):
    """The elementwise sum (``op="max"``: maximum) of ``x`` over the ranks of ``group``, on every rank.

    ``out``: an array of ``x``'s shape and dtype to write the result into instead of a new one (``x``
    itself, or memory not overlapping it); ``out=x`` reduces in place (``MPI_IN_PLACE``), for a buffer
    the caller owns and no longer needs -- the one exception to "never writes into its input", asked
    for by name. It saves allocating an S-sized result: the data-parallel buckets reduce their packed
    copy this way.

    Ring cost: 2(n-1)/n · S bytes sent per rank (a reduce-scatter then an all-gather, each passing n-1
    blocks of S/n around the ring).

    Always refused (``ValueError``, no communication): an unknown ``op``; an ``out`` of another shape or
    dtype. Only in checked mode: ranks whose ``x`` differ in shape or dtype (else: garbage or NaN, or
    MPI reading past the smaller buffer), a rank calling another collective.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce op must be one of {sorted(_REDUCE_OPS)}, not {op!r}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"all_reduce: out has shape {out.shape} and dtype {out.dtype}; "
                         f"the result has {x.shape} and {x.dtype}")
    n = group.size
    end = _begin("all_reduce", group, x, tag, x.shape, x.nbytes, 2 * (n - 1) * x.nbytes / n)
    if n == 1:
        if out is None or out is x:
            return x
        out[...] = x
        return out
    send, mpi_op = _for_reduction(x), _reduce_op(op, x.dtype)
    if out is not None and _for_reduction(out) is out:  # MPI can write into out itself
        if out is x:
            group.comm.Allreduce(MPI.IN_PLACE, _buffer(out), op=mpi_op)
        else:
            group.comm.Allreduce(_buffer(send), _buffer(out), op=mpi_op)
        end()
        return out
    total = backend.array_module(send).empty_like(send)
    group.comm.Allreduce(_buffer(send), _buffer(total), op=mpi_op)
    end()
    if out is not None:  # a non-contiguous out, or a CuPy one staged through the host: one copy in
        out[...] = _like(total, out)
        return out
    return _like(total, x)


def all_gather(x, group, axis=0, tag=""):
    """The ranks' arrays ``x`` concatenated along ``axis`` in rank order, on every rank.

    Each rank sends its whole ``x`` (one contiguous block whatever the axis) and receives the n blocks
    rank-major, shape (n, *x.shape). Along axis 0 that buffer already is the concatenation (no copy);
    along another axis the rank index must move next to that axis, one copy. Ring cost: (n-1)/n · S
    bytes sent per rank, S the gathered array.

    Always refused (``ValueError``, no communication): an ``axis`` out of range. Only in checked mode:
    shards of unequal shape across the ranks (uneven blocks: without checked mode the result silently
    holds uninitialised memory or a truncated block), or of unequal dtype, and a rank calling another
    collective. Every rank's shard must have the same shape: there is no all-gather of uneven blocks.
    """
    n = group.size
    axis = _axis(x, axis)
    gathered_shape = x.shape[:axis] + (x.shape[axis] * n,) + x.shape[axis + 1:]
    end = _begin("all_gather", group, x, tag, gathered_shape, n * x.nbytes, (n - 1) * x.nbytes)
    if n == 1:
        return x
    send = _for_mpi(x)
    xp = backend.array_module(send)
    blocks = xp.empty((n,) + send.shape, dtype=send.dtype)
    group.comm.Allgather(_buffer(send), _buffer(blocks))
    end()
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

    Always refused (``ValueError``, no communication): an axis length the group size does not divide,
    an ``axis`` out of range. Only in checked mode: ranks whose ``x`` differ in shape or dtype (without
    it, a dtype that differs sums the bytes of one type as another: NaN or garbage, no error), a rank
    calling another collective.
    """
    n = group.size
    axis = _axis(x, axis)
    block = x.shape[axis] // n
    if x.shape[axis] % n:  # the message is built only for the error: formatting a shape costs a microsecond
        divide(x.shape[axis], n, f"reduce_scatter: the length of axis {axis} of an array of shape {x.shape}")
    end = _begin("reduce_scatter", group, x, tag, x.shape, x.nbytes, (n - 1) * x.nbytes / n)
    if n == 1:
        return x
    xp = backend.array_module(x)
    block_shape = x.shape[:axis] + (block,) + x.shape[axis + 1:]
    rank_major = x
    if axis != 0:
        # (..., n*k, ...) -> (..., n, k, ...) -> (n, ..., k, ...): each rank's block contiguous (a copy)
        rank_major = xp.moveaxis(x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:]), axis, 0)
    send = _for_reduction(rank_major)
    mine = backend.array_module(send).empty(block_shape, dtype=send.dtype)
    group.comm.Reduce_scatter_block(_buffer(send), _buffer(mine), op=_reduce_op("sum", send.dtype))
    end()
    return _like(mine, x)


def broadcast(x, group, root=0, tag=""):
    """Rank ``root``'s ``x`` on every rank (the others pass an array of the same shape and dtype, whose
    values are ignored).

    Logged ring cost: (n-1)/n · S bytes per rank -- what each rank passes on in the all-gather phase of
    the scatter + ring all-gather broadcast that MPI uses for large buffers (the root also sends
    (n-1)/n · S in the scatter phase, not counted). Small buffers go down a tree instead.

    Only in checked mode: a rank whose buffer has another shape or dtype than the root's, a rank calling
    another collective. (Different ``root`` values across the ranks are caught by no check.)
    """
    n = group.size
    end = _begin("broadcast", group, x, tag, x.shape, x.nbytes, (n - 1) * x.nbytes / n)
    if n == 1:
        return x
    values = _for_mpi(x)
    if backend.data_ptr(values) == backend.data_ptr(x):
        # Bcast writes in place; the caller's x must stay as it was. The copy is GPU work: _for_mpi
        # again, so that a CUDA-aware MPI reads it only once the stream has written it
        values = _for_mpi(values.copy())
    group.comm.Bcast(_buffer(values), root=root)
    end()
    return _like(values, x)


def split(x, group, axis):
    """This rank's block of ``x`` along ``axis`` (a view; no communication, not logged).

    Block r is ``[r*k, (r+1)*k)`` with k = length / group size: the inverse of ``all_gather``.
    ``ValueError`` when the group size does not divide the length (local: always checked).
    """
    axis = _axis(x, axis)
    block = divide(x.shape[axis], group.size, f"split: the length of axis {axis} of an array of shape {x.shape}")
    index = [slice(None)] * x.ndim
    index[axis] = slice(group.rank * block, (group.rank + 1) * block)
    return x[tuple(index)]
