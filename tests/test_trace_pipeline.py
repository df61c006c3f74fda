"""Traces of pipelines and of ring attention: what minitp.trace records beyond ops and collectives, and
what trace_report makes of it.

Proven, on a pipeline's forward-backward (2 and 4 ranks: AFAB, 1F1B, interleaved; dp 2 × pp 2): every
stage's run is one "pipeline" span whose arguments name its pipeline; every microbatch's F and B of
every chunk is a "microbatch" span; every receive is a "recv" span and every send a "send" span on a
lane of sends in flight, as many as the plan exchanges (counted by hand below), each with its peer and
bytes; every lane nests; trace_report gives every stage a measured bubble in (0, 1) and, beside it, the
formula (p-1)/(v·m+p-1). On ring attention (cp 2): each ring step's attention is a span, and each
exchange a "sendrecv" span with the collective log's bytes and tags -- cp - 1 forward, cp backward, per
layer. Timing ratios are not asserted (a loaded machine moves them); the structure is.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm, trace_report
from minitp.nn import GPTConfig
from minitp.parallel.gpt import ParallelGPT
from minitp.pipeline import PipelineGPT
from minitp.pipeline.training import forward_backward
from test_trace import nests  # one test of nesting for every trace test

WORLD = MPI.COMM_WORLD
CONFIG = dict(vocab=16, seq_len=4, hidden=8, heads=2, layers=8, dropout=0.0, seed=3, dtype="float64")
BATCH = 8


def lane_problems(trace):
    """Every lane of every rank whose spans do not nest."""
    events = trace["traceEvents"]
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    problems = []
    for (pid, tid), lane in lanes.items():
        if not nests([(e["ts"], e["ts"] + e["dur"]) for e in spans if (e["pid"], e["tid"]) == (pid, tid)]):
            problems.append(f"rank {pid}: the spans of lane {lane!r} do not nest")
    return problems, lanes


def exchanges(p, v, stage, m):
    """By hand, what stage ``stage`` of p (v chunks each) sends and receives in one step of m microbatches:
    model chunk c = k·p + stage; every chunk but the model's last sends its m activations forward and
    receives their m gradients, every chunk but the model's first receives m activations and sends m
    gradients. {(kind, direction): count}."""
    chunks = [k * p + stage for k in range(v)]
    last = p * v - 1
    not_last, not_first = sum(c != last for c in chunks), sum(c != 0 for c in chunks)
    return {("activation", "send"): m * not_last, ("gradient", "recv"): m * not_last,
            ("activation", "recv"): m * not_first, ("gradient", "send"): m * not_first}


def cases():
    """(dp, pp, schedule, m, v) for this world."""
    if WORLD.size == 2:
        return [(1, 2, "afab", 4, 1), (1, 2, "1f1b", 4, 1), (1, 2, "interleaved", 2, 2)]
    return [(1, 4, "afab", 4, 1), (1, 4, "1f1b", 4, 1), (1, 4, "interleaved", 4, 2), (2, 2, "1f1b", 2, 1)]


@pytest.mark.parallel(nprocs=[2, 4])
def test_a_pipeline_trace_shows_every_send_receive_and_microbatch_and_its_bubble():
    windows = numpy.random.default_rng(0).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, BATCH))
    ids, targets = windows[:-1], windows[1:]
    for dp, p, schedule, m, v in cases():
        where = f"dp {dp} pp {p} {schedule} m={m} v={v}"
        mesh = comm.init(dp=dp, pp=p)
        model = PipelineGPT(GPTConfig(**CONFIG), mesh, virtual_stages=v)
        with comm.log_collectives() as log, comm.record_timeline(mesh) as timeline:
            forward_backward(model, ids, targets, mesh, schedule, m)
        logged = sorted((r.op, r.tag) for r in log if r.op in ("send", "recv"))
        mine = WORLD.gather((mesh.pp_rank, logged), root=0)
        problems = []
        if WORLD.rank == 0:
            written = timeline.trace
            problems, lanes = lane_problems(written)
            spans = [e for e in written["traceEvents"] if e["ph"] == "X"]
            activation_bytes = (CONFIG["seq_len"] * BATCH // (dp * m) * CONFIG["hidden"]) * 8
            for pid, (stage, logged_here) in enumerate(mine):
                here = [e for e in spans if e["pid"] == pid]
                runs = [e for e in here if e["cat"] == "phase" and e["name"] == "pipeline"]
                group = [r for r in range(WORLD.size) if r // p == pid // p]  # (dp, pp): the same dp rank
                if len(runs) != 1 or runs[0]["args"]["ranks"] != group or runs[0]["args"]["stage"] != stage:
                    problems.append(f"rank {pid}: pipeline spans {[e['args'] for e in runs]}")
                counted = {}
                for e in here:
                    if e["name"] in ("send", "recv"):
                        kind = "activation" if "activation" in e["args"]["tag"] else "gradient"
                        counted[kind, e["name"]] = counted.get((kind, e["name"]), 0) + 1
                        lane = lanes[pid, e["tid"]]
                        send = e["name"] == "send"
                        right_lane = lane.startswith("sends in flight") if send else lane == "communication"
                        right_cat = e["cat"] == ("p2p inflight" if send else "p2p")
                        if not (right_lane and right_cat and e["args"]["bytes"] == activation_bytes):
                            problems.append(f"rank {pid}: {e['name']} on {lane!r}, {e['cat']}, {e['args']}")
                expected = {key: n for key, n in exchanges(p, v, stage, m).items() if n}
                if counted != expected:
                    problems.append(f"rank {pid} (stage {stage}): sends and receives {counted}, by hand {expected}")
                traced = sorted((e["name"], e["args"]["tag"]) for e in here if e["name"] in ("send", "recv"))
                if traced != logged_here:
                    problems.append(f"rank {pid}: the traced sends and receives are not the collective log's")
                microbatches = sorted(e["name"].split()[0] for e in here if e["cat"] == "microbatch")
                if microbatches != ["B"] * (m * v) + ["F"] * (m * v):
                    problems.append(f"rank {pid}: microbatch spans {microbatches}, expected {m * v} F and {m * v} B")
            formula = (p - 1) / (v * m + p - 1)  # the papers' bubble, by hand
            rows = trace_report.breakdown(written)
            table = trace_report.table(rows).splitlines()
            for row in rows:
                if row.bubble is None or not 0 < row.bubble < 1 or row.formula != formula:
                    problems.append(f"{row.name}: measured bubble {row.bubble}, formula {row.formula} "
                                    f"(by hand {formula})")
                    continue
                line = next(line for line in table if line.startswith(f"| {row.name} |"))
                if f"| {100 * row.bubble:.0f}% | {100 * formula:.0f}% |" not in line:
                    problems.append(f"the table's row shows no measured bubble beside the formula: {line}")
                if not 0 < row.waiting <= row.window:
                    problems.append(f"{row.name}: waited {row.waiting} µs of {row.window}")
            problems = [f"{where}: {problem}" for problem in problems]
        problems = WORLD.bcast(problems, root=0)
        parallel_assert(not problems, "\n".join(problems))


def test_the_bubble_of_a_hand_made_pipeline():
    # two stages, one step each, µs: stage 0 runs [0, 100) and waits in a receive [40, 70); stage 1 runs
    # [10, 80) and waits [10, 30). The pipeline's window is [0, 100): stage 0 waits 30 of 100; stage 1
    # waits 20 inside its run plus 30 outside it (before 10, after 80): 50 of 100. p = 2, m = 4: 1/5.
    def span(pid, cat, name, start, end, **args):
        return {"ph": "X", "pid": pid, "tid": 0, "cat": cat, "name": name, "ts": start, "dur": end - start,
                "args": args}
    run = dict(stages=2, microbatches=4, chunks=1, ranks=[0, 1])
    written = {"traceEvents": [
        span(0, "phase", "pipeline", 0, 100, stage=0, **run), span(0, "p2p", "recv", 40, 70, bytes=8),
        span(0, "compute", "MatMul", 0, 40), span(0, "compute", "MatMul backward", 70, 100),
        span(1, "phase", "pipeline", 10, 80, stage=1, **run), span(1, "p2p", "recv", 10, 30, bytes=8),
        span(1, "compute", "MatMul", 30, 80)]}
    rows = trace_report.breakdown(written)
    assert [(row.waiting, row.window, row.bubble) for row in rows] == [(30, 100, 0.3), (50, 100, 0.5)]
    assert [row.formula for row in rows] == [1 / 5, 1 / 5]
    assert "| 30% | 20% | 0.0 of 0.1 |" in trace_report.table(rows)
    assert "░" in trace_report.text_timeline(written, width=10)  # stage 0's receive, and stage 1's


@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize("kind", ["ring", "zigzag"])
def test_a_ring_attention_trace_shows_every_ring_step(kind):
    config = dict(vocab=24, seq_len=16, hidden=16, heads=8, layers=2, dropout=0.0, seed=5, dtype=numpy.float64)
    cp, layers = WORLD.size, config["layers"]
    mesh = comm.init(cp=cp)
    model = ParallelGPT(GPTConfig(**config), mesh, context_parallel=kind)
    windows = numpy.random.default_rng(1).integers(0, config["vocab"], (config["seq_len"] + 1, 2))
    with comm.log_collectives() as log, comm.record_timeline(mesh) as timeline:
        model.loss(windows[:-1], windows[1:]).backward()
    logged = sorted((r.op, r.payload_bytes, r.tag) for r in log if r.op == "sendrecv")
    mine = WORLD.gather(logged, root=0)
    problems = []
    if WORLD.rank == 0:
        problems, lanes = lane_problems(timeline.trace)
        spans = [e for e in timeline.trace["traceEvents"] if e["ph"] == "X"]
        # K and V of this rank's s/cp tokens, (2, b, a, s/cp, d) float64
        kv_bytes = 2 * 2 * config["seq_len"] // cp * config["hidden"] * 8
        for pid in range(WORLD.size):
            here = [e for e in spans if e["pid"] == pid]
            steps = [e for e in here if e["cat"] == "compute" and e["name"].startswith("ring step")]
            forward = [e for e in steps if not e["name"].endswith("backward")]
            if sorted(e["name"] for e in forward) != sorted(f"ring step {t}" for t in range(cp) for _ in range(layers)):
                problems.append(f"rank {pid}: forward ring steps {[e['name'] for e in forward]}")
            if len(steps) - len(forward) != cp * layers:
                problems.append(f"rank {pid}: {len(steps) - len(forward)} backward ring steps, not {cp * layers}")
            exchanged = [e for e in here if e["name"] == "sendrecv"]
            if any(e["cat"] != "comm" or lanes[pid, e["tid"]] != "communication" for e in exchanged):
                problems.append(f"rank {pid}: a sendrecv off the communication lane")
            ahead = [e for e in exchanged if "forward" in e["args"]["tag"]]
            if len(ahead) != (cp - 1) * layers or any(e["args"]["bytes"] != kv_bytes for e in ahead):
                seen = [(e["args"]["tag"], e["args"]["bytes"]) for e in ahead]
                problems.append(f"rank {pid}: forward exchanges {seen}, expected {(cp - 1) * layers} of {kv_bytes} B")
            if len(exchanged) - len(ahead) != cp * layers:
                problems.append(f"rank {pid}: {len(exchanged) - len(ahead)} backward exchanges, not {cp * layers}")
            if sorted((e["name"], e["args"]["bytes"], e["args"]["tag"]) for e in exchanged) != mine[pid]:
                problems.append(f"rank {pid}: the traced exchanges are not the collective log's")
            # each ring step's compute lies inside its op's span (the op's own compute lane)
            ops = [e for e in here if e["name"] in ("RingAttention", "RingAttention backward")]
            for e in steps:
                if not any(o["ts"] <= e["ts"] + 1e-3 and e["ts"] + e["dur"] <= o["ts"] + o["dur"] + 1e-3 for o in ops):
                    problems.append(f"rank {pid}: {e['name']} outside every RingAttention span")
                    break
    problems = WORLD.bcast(problems, root=0)
    parallel_assert(not problems, "\n".join(problems))
