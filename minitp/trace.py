"""What did this rank do, and when? A recorder of timed spans, the raw material of the per-rank timeline.

Nothing is recorded unless a recording is open (``comm.record_timeline`` opens one on every rank, after a
barrier, and writes the file); outside one, every call site pays one test of ``recording``. Inside one,
each span is (name, category, start, duration, arguments), and the category says what the rank was
doing:

    category   who records it                                    lane (a row of the timeline)
    phase      train_step: step, forward, backward, optimizer    "phases"
    compute    the engine: every op's forward and backward       "compute"
    comm       every blocking collective, with its bytes, and    "communication"
               every wait on a non-blocking one
    p2p        point-to-point sends and receives (pipelines)     "communication"
    inflight   a non-blocking collective, from its start to      "in flight 1", "in flight 2", ...
               its completion, with its bytes

Spans on one lane must nest (Perfetto and chrome://tracing draw a lane as a stack), and on the first three
they do by construction: they are opened and closed by one thread, in call order. Requests in flight
overlap each other freely (two buckets, and a tensor-parallel all-reduce beside them), so each takes
the lowest "in flight" lane that is free when it starts.

A blocking collective runs inside the op that called it (f's backward all-reduce inside
``CopyToTensorParallelRegion backward``): the timeline shows both, and ``minitp.trace_report`` counts
that time as communication, not compute.

Times are ``time.perf_counter()`` seconds, kept relative to the recording's ``origin``; the file is in
microseconds (``comm.timeline``).
"""
import contextlib
import time

LANES = ("phases", "compute", "communication")
"""The fixed lanes, by index (the trace's thread id); "in flight k" lanes follow them."""
CATEGORY_LANE = {"phase": 0, "compute": 1, "comm": 2, "p2p": 2}

now = time.perf_counter

recording = None
"""The open ``Recording`` of this process, or None (then nothing is recorded)."""


class Recording:
    """The spans of one rank: ``events`` is a list of (name, category, lane, start, duration, args), times
    in seconds since ``origin``."""

    def __init__(self, origin):
        self.origin = origin
        self.events = []
        self._inflight_busy = []  # one flag per "in flight" lane: a request is on it now

    def add(self, name, category, lane, started, finished, args=None):
        self.events.append((name, category, lane, started - self.origin, finished - started, args or {}))

    def take_inflight_lane(self):
        """The lowest free "in flight" lane's index (its thread id), now busy."""
        for index, busy in enumerate(self._inflight_busy):
            if not busy:
                self._inflight_busy[index] = True
                return len(LANES) + index
        self._inflight_busy.append(True)
        return len(LANES) + len(self._inflight_busy) - 1

    def free_inflight_lane(self, lane):
        self._inflight_busy[lane - len(LANES)] = False

    def lane_names(self):
        return list(LANES) + [f"in flight {k + 1}" for k in range(len(self._inflight_busy))]


def start(origin=None):
    """Open a recording on this process (``origin``: its time zero, default now) and return it."""
    global recording
    if recording is not None:
        raise RuntimeError("a trace is already being recorded on this process: recordings do not nest")
    recording = Recording(now() if origin is None else origin)
    return recording


def stop():
    """Close the recording and return it (None if none was open)."""
    global recording
    closed, recording = recording, None
    return closed


def complete(name, category, started, args=None):
    """Record a span of ``category`` that began at ``started`` (a ``now()`` reading) and ends now."""
    if recording is not None:
        recording.add(name, category, CATEGORY_LANE[category], started, now(), args)


@contextlib.contextmanager
def span(name, category, **args):
    """``with trace.span("forward", "phase"):`` records the block as one span (when recording)."""
    if recording is None:
        yield
        return
    started = now()
    try:
        yield
    finally:
        complete(name, category, started, args)
