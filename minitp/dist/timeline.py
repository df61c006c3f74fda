"""What did every rank do, and when? Record a timeline on every rank and write it as one Chrome trace.

    with dist.record_timeline(mesh, "trace.json") as timeline:
        train_step(...)
    # trace.json opens in https://ui.perfetto.dev and chrome://tracing; timeline.trace holds it on rank 0

Inside the block every rank records its spans (``minitp.trace``: each op's forward and backward, every
collective with its bytes, every non-blocking collective in flight on a lane of its own, the phases of
a training step). At the end world rank 0 gathers them and writes one file in the Chrome trace-event
format: a "complete" event per span,

    {"ph": "X", "pid": rank, "tid": lane, "name": "MatMul backward", "cat": "compute",
     "ts": microseconds, "dur": microseconds, "args": {...}}

and "M" (metadata) events naming each process row by its mesh coordinates ("rank 3: dp 1, tp 1") and
each lane ("phases", "compute", "communication", "in flight 1", ...).

**One clock.** Each rank's ``perf_counter`` has its own zero. The recording starts after a barrier, and
each rank takes the moment it leaves the barrier as its time zero: ranks leave a barrier within a few
microseconds of one another on one node (MPICH's shared-memory barrier), which is the alignment of the
timeline -- fine for spans of tens of microseconds and more, not for finer ones.

**Errors.** ``check_writable(path, comm)`` tries the path on rank 0 and raises the same ``ValueError``
on every rank when it cannot be written: call it before training, not after. A write that fails at the
end raises ``OSError`` on every rank.
"""
import contextlib
import json
import os

from minitp import trace
from minitp.dist.mesh import AXES


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
    """``ValueError`` on every rank of ``comm`` unless rank 0 can write a file at ``path`` (tried by
    opening it for appending; a file the test created is removed again)."""
    problem = None
    if comm.Get_rank() == 0:
        existed = os.path.exists(path)
        try:
            with open(path, "a"):
                pass
            if not existed:
                os.remove(path)
        except OSError as error:
            problem = f"cannot write the trace to {path}: {error.strerror or error}"
    problem = comm.bcast(problem, root=0)
    if problem is not None:
        raise ValueError(problem)


@contextlib.contextmanager
def record_timeline(mesh, path=None):
    """Record the block on every rank of ``mesh`` (a collective: every rank enters and leaves it);
    gather to world rank 0 and, with ``path``, write the Chrome trace there."""
    world = mesh.world.comm
    timeline = Timeline(path)
    world.Barrier()
    recording = trace.start()  # time zero: the moment this rank leaves the barrier
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
