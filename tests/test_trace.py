"""The per-rank timeline: minitp.trace records, comm.record_timeline writes one Chrome trace for every rank,
minitp.trace_report reads it.

Proven: the file is trace-event JSON with one process per rank named by its mesh coordinates and named
lanes; spans on one lane nest; every collective in the collective log is a span with its bytes; the
clocks agree (no rank leaves a blocking all-reduce before every rank has entered it); compute,
exposed communication and idle add up to the step; the interval arithmetic on a hand-made trace; the
text and PNG pictures; an unwritable path is refused on every rank.
"""
import json
import os

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm, trace, trace_report
from minitp.nn import AdamW, GPTConfig
from minitp.parallel.data.sync import AllReduceGradients
from minitp.training import train_step
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.data.zero import ZeroOptimizer

WORLD = MPI.COMM_WORLD
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.1, seed=1, dtype=numpy.float64)
ALIGNMENT_US = 1000  # how far apart two ranks' clocks may be: the barrier's exit skew, plus scheduling


def rank0_path(tmp_path, name):
    return WORLD.bcast(str(tmp_path / name), root=0)


def traced_steps(mesh, path, zero, overlap, steps=2):
    model = ParallelGPT(GPTConfig(**CONFIG), mesh, sequence_parallel=mesh.tp_size > 1, overlap=overlap)
    optimizer = AdamW(model.named_parameters(), lr=1e-2)
    gradients = None
    if zero:
        optimizer = ZeroOptimizer(optimizer, mesh, 3000, overlap=overlap)
    else:
        gradients = AllReduceGradients(model, mesh, 3000, overlap=overlap)
    ids = numpy.random.default_rng(0).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 4))
    with comm.log_collectives() as log, comm.record_timeline(mesh, path) as timeline:
        for _ in range(steps):
            train_step(model, optimizer, ids[:-1], ids[1:], mesh, max_norm=0.5, gradients=gradients)
    return timeline, log


def nests(spans):
    """Do the (start, end) spans of one lane nest: each either inside or after the ones before?"""
    open_ends = []
    for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
        while open_ends and open_ends[-1] <= start + 1e-3:  # rounding to the nanosecond in the file
            open_ends.pop()
        if open_ends and end > open_ends[-1] + 1e-3:
            return False
        open_ends.append(end)
    return True


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("zero,overlap", [(False, False), (False, True), (True, True)])
def test_the_trace_file_shows_every_rank_and_every_collective(tmp_path, zero, overlap):
    tp = 2 if WORLD.size == 4 else 1
    mesh = comm.init(tp=tp, dp=WORLD.size // tp)
    path = rank0_path(tmp_path, "trace.json")
    _, log = traced_steps(mesh, path, zero, overlap)
    logged = sorted((r.op, r.payload_bytes, r.tag) for r in log if r.group_size > 1)
    mine = WORLD.gather(logged, root=0)

    problems = []
    if WORLD.rank == 0:
        with open(path) as file:
            written = json.load(file)
        events = written["traceEvents"]
        names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
        expected = {r: comm.timeline.rank_name(mesh, r) for r in range(WORLD.size)}
        if names != expected:
            problems.append(f"process names {names}")
        lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
        spans = [e for e in events if e["ph"] == "X"]
        for (pid, tid), lane in lanes.items():
            if not nests([(e["ts"], e["ts"] + e["dur"]) for e in spans if (e["pid"], e["tid"]) == (pid, tid)]):
                problems.append(f"rank {pid}: the spans of lane {lane!r} do not nest")
        for pid in range(WORLD.size):
            traced = sorted((e["name"], e["args"]["bytes"], e["args"]["tag"]) for e in spans if e["pid"] == pid
                            and e["cat"] in ("comm", "inflight") and not e["name"].startswith("wait "))
            if traced != mine[pid]:
                problems.append(f"rank {pid}: the trace's collectives {traced} are not the log's {mine[pid]}")
            if overlap and not any(e["cat"] == "inflight" and e["pid"] == pid for e in spans):
                problems.append(f"rank {pid}: nothing in flight")
        # one clock: the k-th blocking all-reduce over the world's dp group ends on no rank before it began on all
        for group_ranks in ({r for r in range(WORLD.size) if r % tp == t} for t in range(tp)):
            calls = [[e for e in spans if e["pid"] == r and e["cat"] == "comm" and e["name"] == "all_reduce"
                      and e["args"]["group"] == "dp"] for r in sorted(group_ranks)]
            for k, same in enumerate(zip(*calls)):
                if max(e["ts"] for e in same) > min(e["ts"] + e["dur"] for e in same) + ALIGNMENT_US:
                    problems.append(f"dp all-reduce {k}: {[(e['ts'], e['dur']) for e in same]}")
        for row in trace_report.breakdown(written):
            total = row.compute + row.communication + row.idle
            if abs(total - row.step) > 1e-6 * row.step or min(row.compute, row.communication, row.idle) < 0:
                problems.append(f"{row.name}: {row.compute} + {row.communication} + {row.idle} != {row.step}")
    problems = WORLD.bcast(problems, root=0)
    parallel_assert(not problems, "\n".join(problems))


def test_the_report_on_a_hand_made_trace():
    # one rank, one 100 µs step: ops over [0, 60) and [70, 90), a blocking all-reduce at [50, 60) inside
    # the first op, a bucket in flight over [20, 45). Compute C = [0, 50) + [70, 90) = 70; communication
    # M = [20, 45) + [50, 60) = 35, of which [20, 45) is hidden behind C: exposed 10, overlap 25/35;
    # idle = 100 - |C ∪ M| = 100 - 80 = 20
    def span(cat, name, start, end, **args):
        return {"ph": "X", "pid": 0, "tid": 0, "cat": cat, "name": name, "ts": start, "dur": end - start, "args": args}
    written = {"traceEvents": [
        {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "rank 0: dp 0, tp 0"}},
        span("phase", "step", 0, 100), span("compute", "MatMul backward", 0, 60),
        span("comm", "all_reduce", 50, 60, tag="f backward", bytes=8), span("compute", "Add", 70, 90),
        span("inflight", "all_reduce", 20, 45, tag="gradients (bucket 1/1)", bytes=8)]}
    [row] = trace_report.breakdown(written)
    assert (row.step, row.compute, row.communication, row.idle, row.hidden) == (100, 70, 10, 20, 25)
    assert row.overlap == 25 / 35 and row.bubble is None
    [gradients] = trace_report.breakdown(written, tag="gradients")  # only the bucket counts as communication
    assert (gradients.communication, gradients.hidden, gradients.overlap) == (0, 25, 1.0)
    assert "| rank 0: dp 0, tp 0 | 0.1 | 0.1 | 0.0 | 0.0 | 71% | — |" in trace_report.table([row])
    picture = trace_report.text_timeline(written, width=10)  # 10 µs a column
    assert "  compute |█████  ██ |" in picture and "  comm    |  ───▓    |" in picture, picture
    written["traceEvents"].append(span("p2p", "recv", 90, 95, bytes=8))
    [pipeline] = trace_report.breakdown(written)
    assert pipeline.bubble == 5 / 100 and pipeline.formula is None  # blocked in the receive [90, 95); the gaps are no neighbour's


@pytest.mark.parallel(nprocs=[2])
def test_pictures_of_a_real_trace(tmp_path):
    mesh = comm.init(tp=1, dp=2)
    timeline, _ = traced_steps(mesh, None, zero=False, overlap=True)
    ok = True
    if timeline.trace is not None:
        text = trace_report.text_timeline(timeline.trace, step=1)
        ok = text.count("rank ") == 2 and "B" in text and "█" in text
        plt = pytest.importorskip("matplotlib")
        if plt:
            png = trace_report.plot(timeline.trace, str(tmp_path / "timeline.png"), step=1)
            ok &= os.path.getsize(png) > 1000
    parallel_assert(WORLD.bcast(ok, root=0), "the text timeline and the PNG")
    parallel_assert(trace.recording is None, "the recording is closed")


@pytest.mark.parallel(nprocs=[2])
def test_a_path_that_cannot_be_written_is_refused_on_every_rank(tmp_path):
    mesh = comm.init(tp=1, dp=2)
    message = None
    try:
        comm.check_writable(rank0_path(tmp_path, "no/such/directory/trace.json"), mesh.world.comm)
    except ValueError as error:
        message = str(error)
    parallel_assert(message is not None and "cannot write the trace" in message, f"ValueError: {message}")
    fine = rank0_path(tmp_path, "trace.json")
    comm.check_writable(fine, mesh.world.comm)
    parallel_assert(WORLD.bcast(not os.path.exists(fine), root=0), "the probe leaves no file behind")


@pytest.mark.parallel(nprocs=[2, 3])
def test_a_rank_on_another_node_estimates_its_clock_offset(monkeypatch):
    # pretend every rank but 0 runs on a machine of its own: each then measures its offset from rank 0's
    # clock by round trips. Here the clocks are one, so the estimate must come out near zero.
    monkeypatch.setattr(comm.timeline, "_node", lambda: f"node {WORLD.rank}")
    zero = comm.timeline._rank0_zero(WORLD)
    error = abs(zero - WORLD.bcast(zero, root=0))
    parallel_assert(error < 0.05, f"offset estimated {error * 1e3:.3f} ms from the truth, 0")
