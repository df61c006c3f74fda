"""Which collectives run while this rank computes, and what makes them progress?

``iall_reduce``, ``ireduce_scatter`` and ``iall_gather`` start a collective (MPI's ``Iallreduce``,
``Ireduce_scatter_block``, ``Iallgather``) and return a ``Pending`` at once; ``pending.wait()`` returns
exactly the array the blocking twin in ``collectives.py`` returns. Between the two calls the rank is free
to compute: that is how data parallelism hides the gradient reduction behind backward, and how the
column-parallel layer hides its input-gradient all-reduce behind the weight-gradient GEMM.

**Checks.** As for the blocking twins (``collectives.py``, "What is checked"): always, locally, a
length that the group size does not divide (``ireduce_scatter``); only in checked mode, ranks whose
arrays differ in shape or dtype, or that call different collectives -- an ``iall_reduce`` on one rank
and a blocking ``all_reduce`` on another included (MPI never matches the two: a hang, without checked
mode). Checked mode's allgather is blocking: it makes the start wait for the slowest rank.

Each is logged when it starts, like its blocking twin (the same shape, payload and ring bytes, with
``blocking=False``), and while a trace is recorded it is drawn twice: an "in flight" span from its start
to its completion, and a "comm" span for the time ``wait()`` blocked.

**Progress.** The MPI standard lets a library move a non-blocking collective's bytes only while some MPI
call runs on the rank. Measured with the MPICH wheel from PyPI (5.0, shared memory, 2 ranks, an
Iallreduce of 16 MB started before 60 ms of GEMMs): ``Iallreduce`` itself did ~3 ms of it, and ``Wait``
then blocked 5-15 ms, about what the blocking all-reduce takes alone -- nothing moved during the GEMMs.
Three ways to help, measured on the same run (benchmarks/overlap.py repeats it):

- a progress thread (``progress="thread"``, the default): a Python thread calls ``MPI_Test`` on the
  requests in flight every ``POLL_SECONDS`` while there are any, and sleeps on a condition otherwise.
  numpy's GEMMs release the GIL, so it runs during them. ``Wait`` then blocked 0.01 ms. mpi4py
  initialises MPI with ``MPI_THREAD_MULTIPLE`` (``mpi4py.rc.thread_level``), which a second thread
  calling MPI needs; every call on our requests takes one lock, because two threads must not test or
  wait on one request at once.
- MPICH's own progress thread, ``MPIR_CVAR_ASYNC_PROGRESS=1`` in the environment (also needs
  ``MPI_THREAD_MULTIPLE``): ``Wait`` blocked 0 ms too, but that thread spins on a core of its own: on a
  machine whose cores the ranks already use, the GEMMs ran ~3× slower. Use it where cores are spare,
  with ``progress="calls"``.
- periodic tests from the main thread between pieces of work: they work (0 ms) where there are pieces
  (between ops), not inside one long GEMM; the thread covers both.

``progress="calls"`` (``set_progress`` or ``MINITP_PROGRESS=calls``) leaves progress to MPI calls alone:
the comparison the overlap benchmark makes.
"""
import os
import threading
import time

from minitp import backend, trace
from minitp.comm import checks, log
from minitp.comm.collectives import _buffer, _for_reduction, _reduce_op
from minitp.comm.mesh import divide
from minitp.comm.runtime import _for_mpi, _like

POLL_SECONDS = 1e-4
"""How often the progress thread tests the requests in flight (Python's sleep adds ~50 µs to it)."""
PROGRESS_MODES = ("thread", "calls")

_progress = os.environ.get("MINITP_PROGRESS", "thread")
if _progress not in PROGRESS_MODES:  # at import, on every rank alike: before anything runs
    raise ValueError(f"MINITP_PROGRESS must be one of {PROGRESS_MODES}, not {_progress!r}")
_lock = threading.Condition()  # guards every MPI call on our requests, and _in_flight
_in_flight = []  # the Pending not yet waited for
_thread = None


def set_progress(mode):
    """``"thread"``: a progress thread tests the requests in flight; ``"calls"``: only MPI calls made
    anyway (starts, waits, blocking collectives) move them."""
    global _progress
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, not {mode!r}")
    _progress = mode


def progress():
    """The progress mode in use."""
    return _progress


class Pending:
    """A collective in flight. ``wait()`` blocks until it is done and returns its result (once);
    ``done()`` tests without blocking."""

    def __init__(self, request, result, original, op, group, payload_bytes, ring_bytes, tag, keep):
        self.request, self._result, self._original, self._keep = request, result, original, keep
        self.op, self.group, self.tag = op, group, tag
        self.args = dict(group=group.name, bytes=int(payload_bytes), ring_bytes=ring_bytes, tag=tag)
        self.started, self.completed, self._waited = trace.now(), None, False
        self._recording = trace.recording
        self._lane = self._recording.take_inflight_lane() if self._recording is not None else None

    def _test(self):
        """(with the lock held) Test the request once; note when it was first seen complete."""
        if self.completed is None and self.request.Test():
            self.completed = trace.now()
        return self.completed is not None

    def done(self):
        with _lock:
            return self._test()

    def wait(self):
        if self._waited:
            raise RuntimeError(f"{self.op} ({self.tag}): wait() was already called")
        started = trace.now()
        with _lock:
            if self.completed is None:
                self.request.Wait()
                self.completed = trace.now()
            _in_flight.remove(self)
        self._waited = True
        if self._recording is not None and self._recording is trace.recording:
            trace.complete(f"wait {self.op}", "comm", started, dict(self.args))
            self._recording.add(self.op, "inflight", self._lane, self.started, self.completed, self.args)
            self._recording.free_inflight_lane(self._lane)
        self._keep = None  # the send buffer may go now
        return _like(self._result, self._original)


def _start(op, group, x, result_shape, payload_bytes, ring_bytes, tag, call):
    """Check (in checked mode, as the blocking twins do: the same call, shape and dtype on every rank,
    else the same ``ValueError`` on every rank before anything starts), log, then start ``call(send,
    receive)`` under the lock; a ``Pending`` for it. Over one rank there is nothing to start: ``x``
    itself is the result, as with the blocking twins."""
    if group.size > 1 and checks.checked():
        checks.agree_on_array(group, op, tag, x, call=f"i{op}")
    if log._active_logs:
        log._record(op, group, result_shape if op == "all_gather" else x.shape, x.dtype, payload_bytes,
                    ring_bytes, tag, blocking=False)
    if group.size == 1:
        return _Done(x)
    send = _for_mpi(x) if op == "all_gather" else _for_reduction(x)  # a sum of _Words: on the host
    receive = backend.array_module(send).empty(result_shape, dtype=send.dtype)
    with _lock:
        request = call(_buffer(send), _buffer(receive))
        pending = Pending(request, receive, x, op, group, payload_bytes, ring_bytes, tag, keep=send)
        _in_flight.append(pending)
        if _progress == "thread":
            _ensure_thread()
            _lock.notify()
    return pending


class _Done:
    """A collective over one rank: nothing to wait for."""

    def __init__(self, result):
        self._result = result

    def done(self):
        return True

    def wait(self):
        return self._result


def iall_reduce(x, group, tag=""):
    """Start the sum of ``x`` over ``group`` (``all_reduce``'s non-blocking twin); ring cost 2(n-1)/n · S.
    Only in checked mode: ranks whose ``x`` differ in shape or dtype (else garbage or NaN), a rank calling
    another collective."""
    n = group.size
    return _start("all_reduce", group, x, x.shape, x.nbytes, 2 * (n - 1) * x.nbytes / n, tag,
                  lambda send, receive: group.comm.Iallreduce(send, receive, op=_reduce_op("sum", x.dtype)))


def ireduce_scatter(x, group, tag=""):
    """Start the sum of ``x`` over ``group`` of which rank r keeps block r along axis 0 (a flat bucket,
    a sequence block): ``reduce_scatter``'s non-blocking twin; ring cost (n-1)/n · S.
    Always refused (``ValueError``, nothing started): a length of axis 0 the group size does not divide.
    Only in checked mode: ranks whose ``x`` differ in shape or dtype, a rank calling another collective."""
    n = group.size
    block = divide(x.shape[0], n, f"ireduce_scatter: the length of axis 0 of an array of shape {x.shape}")
    return _start("reduce_scatter", group, x, (block,) + x.shape[1:], x.nbytes, (n - 1) * x.nbytes / n, tag,
                  lambda send, receive: group.comm.Ireduce_scatter_block(send, receive, op=_reduce_op("sum", x.dtype)))


def iall_gather(x, group, tag=""):
    """Start the concatenation of the ranks' ``x`` along axis 0 (``all_gather``'s non-blocking twin);
    ring cost (n-1)/n · S, S the gathered array.
    Only in checked mode: shards of unequal shape (uneven blocks: else uninitialised memory in the
    result) or dtype across the ranks, a rank calling another collective."""
    n = group.size
    shape = (n * x.shape[0],) + x.shape[1:]
    return _start("all_gather", group, x, shape, n * x.nbytes, (n - 1) * x.nbytes, tag,
                  lambda send, receive: group.comm.Iallgather(send, receive))


# -- the progress thread ----------------------------------------------------------------------------


def _ensure_thread():
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_poll, name="minitp MPI progress", daemon=True)
        _thread.start()


def _poll():
    """Test every request in flight, then sleep; sleep on the condition while none is."""
    while True:
        with _lock:
            while not _in_flight or _progress != "thread":
                _lock.wait()
            for pending in _in_flight:
                pending._test()
        time.sleep(POLL_SECONDS)
