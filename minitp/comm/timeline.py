"""What did every rank do, and when? Record a timeline on every rank and write it as one Chrome trace.

    with comm.record_timeline(mesh, "trace.json") as timeline:
        train_step(...)
    # trace.json opens in https://ui.perfetto.dev and chrome://tracing; timeline.trace holds it on rank 0

Inside the block every rank records its spans (``minitp.trace``: each op's forward and backward, every
collective with its bytes, every non-blocking collective in flight on a lane of its own, the phases of
a training step; on a pipeline stage its schedule, each microbatch's F and B, every receive and every
send in flight; ring attention's steps and exchanges). At the end world rank 0 gathers them and writes
one file in the Chrome trace-event format: a "complete" event per span,

    {"ph": "X", "pid": rank, "tid": lane, "name": "MatMul backward", "cat": "compute",
     "ts": microseconds, "dur": microseconds, "args": {...}}

and "M" (metadata) events naming each process row by its mesh coordinates ("rank 3: dp 1, tp 1") and
each lane ("phases", "compute", "communication", "in flight 1", ..., "sends in flight 1", ...).

**One clock.** ``perf_counter`` is the machine's monotonic clock (``CLOCK_MONOTONIC`` on Linux): the
ranks of one node read the same clock, and rank 0's time zero, taken after a barrier and broadcast, is
everyone's. A rank on another node reads another clock; it estimates its offset from rank 0's the way
NTP does: it sends its time t0, rank 0 answers with its time u, the answer arrives at t1, and the
offset is (t0 + t1)/2 - u, from the fastest of ``CLOCK_ROUNDS`` round trips (a slow one was delayed on
one leg, and says less); the error is at most half that round trip. (Each rank taking its own zero
as it leaves a barrier is not enough: on a busy machine a rank can leave it milliseconds after another.)

**Errors.** ``check_writable(path, comm)`` tries the path on rank 0 and raises the same ``ValueError``
on every rank when it cannot be written: call it before training, not after. A write that fails at the
end raises ``OSError`` on every rank.
"""
import contextlib
import json
import os

from mpi4py import MPI

from minitp import trace
from minitp.comm.mesh import AXES


class Timeline:
    """What ``record_timeline`` yields: after the block, ``trace`` is the trace-event dict on world rank
    0 (None on the others) and ``path`` where it was written (None if nowhere)."""

    def __init__(self, path):
        self.path, self.trace = path, None


def rank_name(mesh, rank=None):
    """"rank 3: dp 1, tp 1" -- the coordinates of ``rank`` (default: this one) on the axes of size > 1,
    dp and tp always."""
    coordinates = mesh._coordinates(mesh.rank if rank is None else rank)
    shown = [f"{axis} {coordinates[axis]}" for axis in AXES if axis in ("dp", "tp") or mesh.sizes[axis] > 1]
    return f"rank {mesh.rank if rank is None else rank}: " + ", ".join(shown)


def check_writable(path, comm):
    """``ValueError`` on every rank of ``comm`` unless rank 0 can write a FILE at ``path``: not an existing
    directory, not a name ending in a separator, in a directory that exists, and openable for writing
    (tried by opening it for appending, which changes nothing; a file the test created is removed again).

    Rank 0 decides and broadcasts its verdict: every rank raises the same one-line error before any
    training, instead of the run ending in ``IsADirectoryError`` when the trace is written.
    """

    def cannot_write(path):
        """Why a file could not be written at ``path``, in a few words; None if it can."""
        if not path or path.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
            return "that names a directory, not a file (give the file's name, e.g. trace.json)"
        if os.path.isdir(path):
            return f"it is a directory: give the file's name, e.g. {os.path.join(path, 'trace.json')}"
        directory = os.path.dirname(path) or "."
        if not os.path.exists(directory):
            return f"the directory {directory} does not exist"
        if not os.path.isdir(directory):
            return f"{directory} is not a directory"
        existed = os.path.exists(path)
        try:
            # O_NONBLOCK: opening a pipe nobody reads fails at once (ENXIO) instead of blocking rank 0
            # here, and every other rank in the broadcast, forever; on a regular file it changes nothing
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666))
            if not existed:
                os.remove(path)
        except OSError as error:
            return error.strerror or str(error)
        return None

    problem = None
    if comm.Get_rank() == 0:
        problem = cannot_write(os.fspath(path))
        if problem is not None:
            problem = f"cannot write the trace to {path}: {problem}"
    problem = comm.bcast(problem, root=0)
    if problem is not None:
        raise ValueError(problem)


@contextlib.contextmanager
def record_timeline(mesh, path=None):
    """Record the block on every rank of ``mesh`` (a collective: every rank enters and leaves it);
    gather to world rank 0 and, with ``path``, write the Chrome trace there."""
    world = mesh.world.comm
    timeline = Timeline(path)
    recording = trace.start(origin=_rank0_zero(world))
    try:
        yield timeline
    finally:
        trace.stop()
    mine = (rank_name(mesh), recording.lane_names(), recording.events)
    gathered = world.gather(mine, root=0)
    problem = None
    if world.Get_rank() == 0:
        timeline.trace = chrome_trace(gathered, mesh)
        if path is not None:
            try:
                with open(path, "w") as file:
                    json.dump(timeline.trace, file)
            except OSError as error:
                problem = f"writing the trace to {path} failed: {error}"
    problem = world.bcast(problem, root=0)
    if problem is not None:
        raise OSError(problem)


CLOCK_ROUNDS = 8


def _node():
    """The name of this rank's machine (ranks of one machine read one monotonic clock)."""
    return MPI.Get_processor_name()


def _rank0_zero(comm):
    """Rank 0's time zero (after a barrier), in this rank's clock: the same number on rank 0's node; on
    another node, plus this clock's offset from rank 0's, estimated from the fastest round trip."""
    comm.Barrier()
    rank = comm.Get_rank()
    nodes = comm.allgather(_node())
    elsewhere = [r for r, node in enumerate(nodes) if node != nodes[0]]
    zero = comm.bcast(trace.now() if rank == 0 else None, root=0)
    if rank == 0:
        for other in elsewhere:
            for _ in range(CLOCK_ROUNDS):
                comm.recv(source=other, tag=77)
                comm.send(trace.now(), dest=other, tag=77)
    elif rank in elsewhere:
        best = None
        for _ in range(CLOCK_ROUNDS):
            sent = trace.now()
            comm.send(None, dest=0, tag=77)
            theirs = comm.recv(source=0, tag=77)
            received = trace.now()
            if best is None or received - sent < best[0]:
                best = (received - sent, (sent + received) / 2 - theirs)
        zero += best[1]
    return zero


def chrome_trace(ranks, mesh):
    """The trace-event dict of ``ranks`` [(process name, lane names, events)], pid = world rank."""
    events = []
    for pid, (name, lanes, spans) in enumerate(ranks):
        events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}})
        events.append({"ph": "M", "pid": pid, "name": "process_sort_index", "args": {"sort_index": pid}})
        for tid, lane in enumerate(lanes):
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": lane}})
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
        for span_name, category, tid, start, duration, args in spans:
            events.append({"ph": "X", "pid": pid, "tid": tid, "name": span_name, "cat": category,
                           "ts": round(start * 1e6, 3), "dur": round(duration * 1e6, 3), "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"mesh": dict(mesh.sizes), "clock": "perf_counter, zeroed after a barrier"}}
