"""What did this rank do, and when? A recorder of timed spans, the raw material of the per-rank timeline.

Nothing is recorded unless a recording is open (``comm.record_timeline`` opens one on every rank, after a
barrier, and writes the file); outside one, every call site pays one test of ``recording``. Inside one,
each span is (name, category, start, duration, arguments), and the category says what the rank was
doing:

    category      who records it                                    lane (a row of the timeline)
    phase         the training step: step, forward, backward,       "phases"
                  optimizer; a pipeline stage's "pipeline" (its
                  whole schedule, ``pipeline.engine.run``)
    microbatch    a pipeline stage: "F 3" / "B 3" (microbatch 3;    "phases"
                  "F 3 (chunk 5)" when interleaved), the
                  compute of one action, after its receive
    compute       the engine: every op's forward and backward;      "compute"
                  ring attention's "ring step t" (one held K/V
                  block's attention, inside the op's span)
    comm          every blocking collective, with its bytes, every  "communication"
                  wait on a non-blocking one, and context
                  parallelism's exchanges (``sendrecv``: a ring
                  step's K/V; ``all_to_all``)
    p2p           time blocked on a pipeline neighbour: "recv" (a   "communication"
                  receive, from its call until the data is here)
                  and "wait send" (a send not yet taken)
    inflight      a non-blocking collective, from its start to      "in flight 1", "in flight 2", ...
                  its completion, with its bytes
    p2p inflight  a pipeline "send", from its post to its           "sends in flight 1", ...
                  completion as first seen (tested after every
                  action, and when waited)

Spans on one lane must nest (Perfetto and chrome://tracing draw a lane as a stack), and on the first three
they do by construction: they are opened and closed by one thread, in call order (step ⊃ pipeline ⊃
F 3 on "phases"). Requests in flight overlap each other freely (two buckets, and a tensor-parallel
all-reduce beside them; a stage's sends to its two neighbours), so each takes the lowest lane of its
kind ("in flight", "sends in flight") that is free when it starts.

A blocking collective runs inside the op that called it (f's backward all-reduce inside
``CopyToTensorParallelRegion backward``): the timeline shows both, and ``minitp.trace_report`` counts
that time as communication, not compute.

Times are ``time.perf_counter()`` seconds, kept relative to the recording's ``origin``; the file is in
microseconds (``comm.timeline``).
"""
import contextlib
import time

LANES = ("phases", "compute", "communication")
"""The fixed lanes, by index (the trace's thread id); the lanes of requests in flight follow them, in the
order they were first needed."""
CATEGORY_LANE = {"phase": 0, "microbatch": 0, "compute": 1, "comm": 2, "p2p": 2}
INFLIGHT = "in flight"
"""The kind of lane of non-blocking collectives; ``"sends in flight"`` is the pipeline sends'."""

now = time.perf_counter

recording = None
"""The open ``Recording`` of this process, or None (then nothing is recorded)."""


class Recording:
    """The spans of one rank: ``events`` is a list of (name, category, lane, start, duration, args), times
    in seconds since ``origin``."""

    def __init__(self, origin):
        self.origin = origin
        self.events = []
        self._lanes = list(LANES)  # every lane's name, by index (the trace's thread id)
        self._busy = {}  # lane index -> a request is on it now (lanes of requests in flight only)

    def add(self, name, category, lane, started, finished, args=None):
        self.events.append((name, category, lane, started - self.origin, finished - started, args or {}))

    def take_inflight_lane(self, kind=INFLIGHT):
        """The index (thread id) of the lowest free lane of ``kind`` ("in flight", "sends in flight"), now
        busy; a new lane "``kind`` k" when all of them are."""
        mine = [lane for lane, name in enumerate(self._lanes) if name.rsplit(" ", 1)[0] == kind
                and lane >= len(LANES)]
        for lane in mine:
            if not self._busy[lane]:
                self._busy[lane] = True
                return lane
        self._lanes.append(f"{kind} {len(mine) + 1}")
        self._busy[len(self._lanes) - 1] = True
        return len(self._lanes) - 1

    def free_inflight_lane(self, lane):
        self._busy[lane] = False

    def lane_names(self):
        return list(self._lanes)


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
