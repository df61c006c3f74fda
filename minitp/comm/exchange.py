"""What do context parallelism's exchanges compute and cost? ``sendrecv`` to ring neighbours (ring
attention) and ``all_to_all`` (Ulysses).

Both take an array (numpy or CuPy) and a ``Group`` and return a new array, never writing into their
input, like the collectives of ``collectives.py``; on a group of one rank nothing is sent and the
input itself comes back (a ``sendrecv`` to oneself, an all-to-all of one block). Each is recorded in
the collective log (``log.py``) with the bytes THIS rank sends, in ``ring_bytes`` (for these two ops
the bytes are exact, not a ring algorithm's estimate):

    sendrecv      the whole array, once: S
    all_to_all    every block but its own: (n-1)/n · S

Kept apart from the pipeline's point-to-point ``send``/``recv``: a ring step is one simultaneous
send-and-receive (MPI ``Sendrecv``), which cannot deadlock however many ranks pass their blocks on at
once -- every rank sends to ``rank + 1`` and receives from ``rank - 1`` in the same call.

While a trace is recorded (``minitp.trace``) each is a "comm" span named by its op, like a blocking
collective's, with its group, bytes, ring_bytes and tag (``sendrecv``: and its two peers); a
``sendrecv`` to oneself, an ``all_to_all`` of one rank, sends nothing and is no span.
"""
import numpy

from minitp import backend, trace
from minitp.comm import log
from minitp.comm.collectives import _axis, _begin, _buffer
from minitp.comm.mesh import divide
from minitp.comm.runtime import _for_mpi, _like

_RING_TAG = 0  # MPI's message tag of every ring step: the pipeline's sends use their own communicator (pp)


def sendrecv(x, group, send_to, receive_from, tag=""):
    """Send ``x`` to group rank ``send_to`` and return the array of ``x``'s shape and dtype received from
    group rank ``receive_from``, in one step (MPI ``Sendrecv``).

    Always refused (``ValueError``, no communication): a peer outside the group. Caught by no check, in
    checked mode neither (a pair's exchange, not a collective of the group): a neighbour that sends
    another shape or dtype -- a longer message fails in MPI on the receiver alone (truncation), a
    shorter one leaves the rest of the received array uninitialised, one of the same byte size and
    another dtype arrives as garbage.

    A ring step is ``sendrecv(x, group, (rank + 1) % n, (rank - 1) % n)``: every rank passes its block
    to the next one and takes the previous one's. Shapes and dtypes must agree between each pair.
    Bytes sent by this rank: ``x.nbytes`` (logged as op ``"sendrecv"``).
    """
    n = group.size
    for name, peer in (("send_to", send_to), ("receive_from", receive_from)):
        if not 0 <= peer < n:
            raise ValueError(f"sendrecv: {name}={peer} is not a rank of the group {group.name} of {n}")
    if log._active_logs:
        log._record("sendrecv", group, x.shape, x.dtype, x.nbytes, x.nbytes, tag)
    if send_to == group.rank and receive_from == group.rank:
        return x
    send = _for_mpi(x)
    received = backend.array_module(send).empty_like(send)
    started = trace.now() if trace.recording is not None else None
    # An explicit receive tag (mpi4py's default is ANY_TAG): only a ring block can match a ring block,
    # whatever else ever travels on this communicator
    group.comm.Sendrecv(_buffer(send), dest=send_to, sendtag=_RING_TAG, recvbuf=_buffer(received),
                        source=receive_from, recvtag=_RING_TAG)
    if started is not None:
        trace.complete("sendrecv", "comm", started, dict(group=group.name, bytes=int(x.nbytes), ring_bytes=x.nbytes,
                                                         tag=tag, send_to=send_to, receive_from=receive_from))
    return _like(received, x)


def all_to_all(x, group, split_axis, concat_axis, tag=""):
    """Cut ``x`` into n blocks along ``split_axis`` and send block j to rank j; return the n blocks
    received, concatenated along ``concat_axis`` in rank order.

    Ulysses (Jacobs et al. 2023) uses it to turn q, k, v split by sequence into q, k, v split by heads:
    ``split_axis`` = heads, ``concat_axis`` = sequence -- and back, with the two axes swapped. The output
    has ``x.shape[split_axis] / n`` along ``split_axis`` and ``n ·`` ``x.shape[concat_axis]`` along
    ``concat_axis``. ``ValueError`` (before any communication) when n does not divide
    ``x.shape[split_axis]`` (local: always checked). Only in checked mode: ranks whose ``x`` differ in
    shape or dtype, a rank calling another collective (else garbage, a truncation error on some ranks,
    or a hang). Bytes sent by this rank: (n-1)/n · S, S = ``x.nbytes`` (its own block stays).

    MPI's ``Alltoall`` wants block j as the j-th contiguous chunk of the send buffer: the blocks are
    moved to the front first (one copy), and the received (n, ...) buffer is moved to ``concat_axis``
    (one more).
    """
    n = group.size
    split_axis, concat_axis = _axis(x, split_axis), _axis(x, concat_axis)
    block = divide(x.shape[split_axis], n, f"all_to_all: the length of axis {split_axis} of an array of shape {x.shape}")
    end = _begin("all_to_all", group, x, tag, x.shape, x.nbytes, (n - 1) * x.nbytes / n)
    if n == 1:
        return x
    xp = backend.array_module(x)
    # (..., n*k, ...) -> (n, ..., k, ...): block j contiguous, for rank j
    blocks = xp.moveaxis(x.reshape(x.shape[:split_axis] + (n, block) + x.shape[split_axis + 1:]), split_axis, 0)
    send = _for_mpi(blocks)
    received = backend.array_module(send).empty_like(send)
    group.comm.Alltoall(_buffer(send), _buffer(received))
    end()
    received = _like(received, x)
    # (n, ..., k, ...) from ranks 0..n-1 -> rank i's block at [i·m, (i+1)·m) along concat_axis
    shape = list(received.shape[1:])
    shape[concat_axis] *= n
    return xp.ascontiguousarray(xp.moveaxis(received, 0, concat_axis)).reshape(shape)


def all_to_all_v(x, group, send_counts, receive_counts, tag=""):
    """Rows of uneven counts to every rank: the first ``send_counts[0]`` rows of ``x`` (along axis 0) go to
    rank 0, the next ``send_counts[1]`` to rank 1, ...; returns the rows received, rank 0's first, then
    rank 1's: ``sum(receive_counts)`` rows of ``x``'s trailing shape (MPI ``Alltoallv``, counts and
    displacements in elements).

    The expert dispatch and combine of a mixture of experts use it: a rank's tokens for each expert rank
    are a different number each step, so the counts are exchanged first (an ``all_to_all`` of integers)
    and every rank passes the ``receive_counts`` that exchange gave it -- no padding to a capacity, no
    byte sent that is not a token.

    Always refused (``ValueError``, no communication): counts that are not one per rank, negative, or
    ``send_counts`` that do not add up to ``x``'s rows. Only in checked mode: ranks whose rows differ in
    trailing shape or dtype, a rank calling another collective. Caught by no check: ``receive_counts``
    that do not match what the others send (MPI truncates, or leaves rows unwritten). Bytes sent by this
    rank: every row but those it sends to itself.
    """
    n = group.size
    send_counts = [int(c) for c in send_counts]
    receive_counts = [int(c) for c in receive_counts]
    if len(send_counts) != n or len(receive_counts) != n or min(send_counts + receive_counts) < 0:
        raise ValueError(f"all_to_all_v: one non-negative count per rank of {group.name} ({n}) is needed, got "
                         f"send {send_counts} and receive {receive_counts}")
    if sum(send_counts) != x.shape[0]:
        raise ValueError(f"all_to_all_v: the send counts {send_counts} add up to {sum(send_counts)} rows, the "
                         f"array has {x.shape[0]}")
    row = int(numpy.prod(x.shape[1:]))  # elements of one row: MPI's counts and displacements are in elements
    sent = (sum(send_counts) - send_counts[group.rank]) * row * x.dtype.itemsize
    end = _begin("all_to_all_v", group, x, tag, x.shape, x.nbytes, sent, uneven_axis=0)
    if n == 1:
        return x
    xp = backend.array_module(x)
    send = _for_mpi(xp.ascontiguousarray(x))
    received = backend.array_module(send).empty((sum(receive_counts),) + x.shape[1:], dtype=x.dtype)
    displacements = [sum(send_counts[:i]) * row for i in range(n)]
    arrived = [sum(receive_counts[:i]) * row for i in range(n)]
    (send_words, datatype), (received_words, _) = _buffer(send), _buffer(received)  # bfloat16: as 2-byte words
    group.comm.Alltoallv([send_words, ([c * row for c in send_counts], displacements), datatype],
                         [received_words, ([c * row for c in receive_counts], arrived), datatype])
    end()
    return _like(received, x)
