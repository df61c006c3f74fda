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

**In a trace** (``minitp.trace``, while a timeline is recorded): a ``"recv"`` span (category "p2p", lane
"communication") from the call until the data is here -- the time this rank is blocked on its
neighbour, most of it waiting for the sender to get there, the rest the transfer; a ``"send"`` span
(category "p2p inflight", a lane "sends in flight k" of its own, since sends overlap) from the post to
the completion *as first seen*: a send is tested once when posted (below MPI's eager limit it is done
at once), then whenever its owner asks ``done()`` (the engine: after every action) or waits; a
``"wait send"`` span ("p2p") for a ``wait()`` that found it not done. Each carries the peer (a rank of
the group), the bytes, the message tag ``match`` and the ``tag``.
"""
import numpy
from mpi4py import MPI

from minitp import backend, trace
from minitp.comm import log, runtime
from minitp.comm.collectives import _buffer


class PendingSend:
    """A posted send: the MPI request and the buffer MPI is reading (kept alive until done)."""

    def __init__(self, request, buffer, span=None):
        self.request, self.buffer = request, buffer
        # while a trace is recorded: [recording, lane, posted, args] of its "send" span, closed when done
        self._span = span
        if span is not None:
            self.done()

    def done(self):
        """True once MPI has finished with the buffer (then it is released); never blocks."""
        if self.buffer is not None and self.request.Test():
            self.buffer = None
            self._close_span()
        return self.buffer is None

    def wait(self):
        """Block until the receiver has the data; release the buffer."""
        if self.buffer is None:
            return
        started = trace.now()
        self.request.Wait()
        self.buffer = None
        if self._span is not None and self._span[0] is trace.recording:
            trace.complete("wait send", "p2p", started, self._span[3])
        self._close_span()

    def _close_span(self):
        if self._span is not None:
            recording, lane, posted, args = self._span
            self._span = None
            if recording is trace.recording:  # else the recording closed while the send was in flight
                recording.add("send", "p2p inflight", lane, posted, trace.now(), args)
            recording.free_inflight_lane(lane)


SENDS_IN_FLIGHT = "sends in flight"
"""The kind of lane of a pipeline send in flight (``trace.Recording.take_inflight_lane``)."""


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
    span = None
    if trace.recording is not None:
        span = [trace.recording, trace.recording.take_inflight_lane(SENDS_IN_FLIGHT), trace.now(),
                dict(group=group.name, peer=dest, bytes=int(x.nbytes), match=match, tag=tag)]
    return PendingSend(group.comm.Isend(_buffer(buffer), dest=dest, tag=match), buffer, span)


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
    started = trace.now() if trace.recording is not None else None
    try:
        group.comm.Recv(_buffer(buffer), source=source, tag=match, status=status)
        received = status.Get_count(_buffer(buffer)[1])
    except MPI.Exception as error:  # a longer message than the buffer: MPI_ERR_TRUNCATE
        received = f"more than {buffer.size} ({error.Get_error_string().strip()})"
    if started is not None:
        trace.complete("recv", "p2p", started, dict(group=group.name, peer=source, bytes=int(buffer.nbytes),
                                                    match=match, tag=tag))
    if received != buffer.size:
        raise ValueError(f"received {received} elements from rank {source} (tag {match}), expected shape {shape}: "
                         "sender and receiver disagree on the shape")
    return backend.from_host(buffer) if staged else buffer


def wait_all(pending):
    """Complete every ``PendingSend`` in ``pending`` (e.g. at the end of a schedule)."""
    for item in pending:
        item.wait()
