"""Point-to-point: one rank sends an array, one other rank receives it -- what pipeline stages exchange
(activations forward to the next stage, their gradients back to the previous one).

    pending = send(x, group, dest=stage + 1, match=7, tag="F 3 -> stage 2")   # returns at once
    x = recv((s, b, h), "float64", group, source=stage - 1, match=7)            # waits for the data

**Shapes agreed up front.** A receiver allocates its buffer before the data arrives, so both sides
compute the shape and dtype from the same configuration (the pipeline: (s, b/m, h), or (s/t, b/m, h)
under sequence parallelism); ``recv`` refuses a message of another size. ``match`` is MPI's message
tag: it pairs each receive with the one send meant for it, whatever order they were posted in.

**Why no schedule can deadlock on a send.** A blocking ``MPI_Send`` of a large buffer waits until the
receiver has posted the matching receive (the rendezvous protocol). Two neighbours that both send
first -- stage r its activation forward, stage r+1 a gradient backward, as 1F1B's steady state asks --
would each wait for the other's receive, forever. Here every send is posted non-blocking
(``MPI_Isend``) and returns at once, and only receives wait. A rank then waits only for data that its
schedule needs and that the sender's schedule produces; the schedules' logical-clock replay
(``minitp.pipeline.clock``) proves that this waiting always ends. (Megatron pairs each send with a
receive in one ``batch_isend_irecv``; MPI's ``Sendrecv`` would do the same; the argument is the same:
nothing blocks before both directions are posted.) The buffer of a pending send must live until the
send completes: ``PendingSend`` holds it, and ``wait`` ends it.

Both are logged with the collectives (``log.py``): ``"send"`` with the bytes this rank sends as its
ring bytes, ``"recv"`` with the same payload and 0 bytes sent.
"""
import numpy
from mpi4py import MPI

from minitp import backend
from minitp.comm import log, runtime
from minitp.comm.collectives import _buffer


class PendingSend:
    """A posted send: the MPI request and the buffer MPI is reading (kept alive until done)."""

    def __init__(self, request, buffer):
        self.request, self.buffer = request, buffer

    def done(self):
        """True once MPI has finished with the buffer (then it is released); never blocks."""
        if self.buffer is not None and self.request.Test():
            self.buffer = None
        return self.buffer is None

    def wait(self):
        """Block until the receiver has the data; release the buffer."""
        self.request.Wait()
        self.buffer = None


_TAG_UB = []  # MPI's largest message tag, asked once (the query costs more than the check)


def _check_match(match):
    if not _TAG_UB:
        _TAG_UB.append(MPI.COMM_WORLD.Get_attr(MPI.TAG_UB))
    upper = _TAG_UB[0]
    if not 0 <= match <= upper:
        raise ValueError(f"message tag {match} outside MPI's range 0..{upper}: fewer microbatches or chunks")


def send(x, group, dest, match, tag=""):
    """Post ``x`` to rank ``dest`` of ``group`` with message tag ``match``; returns a ``PendingSend`` at
    once (non-blocking). ``x`` is not copied unless MPI needs other memory (a non-contiguous array, a
    CuPy array staged through the host); do not write into it before the send completes.

    Always refused (``ValueError``, nothing sent): a ``match`` outside MPI's tag range. What the receiver
    expects is checked on its side only (``recv``); checked mode adds nothing to point-to-point."""
    _check_match(match)
    if log._active_logs:
        log._record("send", group, x.shape, x.dtype, x.nbytes, x.nbytes, tag)
    buffer = runtime._for_mpi(x)
    return PendingSend(group.comm.Isend(_buffer(buffer), dest=dest, tag=match), buffer)


def recv(shape, dtype, group, source, match, tag=""):
    """The array of ``shape`` and ``dtype`` that rank ``source`` of ``group`` sends with tag ``match``
    (blocking), on this rank's device. ``ValueError`` if the message holds another number of elements.

    Always refused (``ValueError``, on this rank): a ``match`` outside MPI's tag range; a message of
    another byte size than ``shape`` × ``dtype`` (counted in this rank's dtype). Caught by no check,
    checked mode included (a pair's message, not a collective): a message of the same byte size but
    another shape (it is reshaped silently) or dtype (float32 (2k,) arrives as float64 (k,): garbage)."""
    _check_match(match)
    dtype = numpy.dtype(dtype)
    if log._active_logs:
        log._record("recv", group, shape, dtype, int(numpy.prod(shape)) * dtype.itemsize, 0, tag)
    staged = backend.device() != "cpu" and not runtime._cuda_aware  # CuPy through host memory
    xp = numpy if staged else backend.xp
    buffer = xp.empty(shape, dtype=dtype)
    if not staged and xp is not numpy:
        backend.synchronize()
    status = MPI.Status()
    try:
        group.comm.Recv(_buffer(buffer), source=source, tag=match, status=status)
        received = status.Get_count(_buffer(buffer)[1])
    except MPI.Exception as error:  # a longer message than the buffer: MPI_ERR_TRUNCATE
        received = f"more than {buffer.size} ({error.Get_error_string().strip()})"
    if received != buffer.size:
        raise ValueError(f"received {received} elements from rank {source} (tag {match}), expected shape {shape}: "
                         "sender and receiver disagree on the shape")
    return backend.from_host(buffer) if staged else buffer


def wait_all(pending):
    """Complete every ``PendingSend`` in ``pending`` (e.g. at the end of a schedule)."""
    for item in pending:
        item.wait()
