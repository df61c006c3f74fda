"""Pipeline parallelism: a GPT's layers cut into stages, one stage per rank, microbatches flowing through
them by three schedules -- and every gradient is the serial model's, to rounding.

    mpirun -n 4 python tutorials/pipeline.py                      (1 or 2 ranks work too)
    mpirun -n 4 python tutorials/pipeline.py --picture schedules.png

Tensor parallelism (mlp.py, transformer.py) splits every layer and talks inside every layer. Pipeline
parallelism (GPipe, Huang et al. 2019; PipeDream and Megatron-LM, Narayanan et al. 2021) keeps layers
whole and gives each rank a run of consecutive layers -- a *stage*. Only the activations at the
boundaries cross the wire: forward to the next stage, their gradients back. The catch: stage r+1 cannot
start before stage r has finished, so the batch is cut into m *microbatches* that follow one another
through the pipe, and the schedule decides when each stage runs which microbatch's forward (F) and
backward (B). We watch it:

    1. the stages: what each rank holds
    2. the schedules: each rank's plan, the timeline, and the bubble -- exactly the papers' formula
    3. one step on the wire: what each stage sends and receives
    4. the activations each stage holds at its peak
and the check: the loss and every gradient of each schedule equal the serial GPT's, float64, dropout on.

Every rank runs this file; rank 0 prints (minitp.report), each rank's own lines gathered in rank order.
"""
import argparse
from fractions import Fraction

import numpy
from mpi4py import MPI

from minitp import backend, comm, pipeline
from minitp import functional as F
from minitp.nn import GPT, GPTConfig
from minitp.parallel import AllReduceGradients, gather_serial_grads
from minitp.pipeline.picture import draw
from minitp.report import banner, each_rank, ranks, say, verdict
from minitp.testing import max_error

arguments = argparse.ArgumentParser(description="pipeline parallelism, step by step")
arguments.add_argument("--picture", default="pipeline_schedules.png", help="where to save the timelines' picture")
arguments = arguments.parse_args()

mesh = comm.init(pp=MPI.COMM_WORLD.Get_size())  # every rank one stage: pp = the world, tp = dp = 1
p, stage = mesh.pp_size, mesh.pp_rank
banner(f"a GPT cut into {p} pipeline stage{'s' * (p > 1)}, one per rank")

# A small GPT in float64: 8 blocks (p × v = 8 chunks of one block at p = 4, v = 2), dropout on, the
# token embedding tied to the head. A global batch of B = 8 sequences, cut into m = 4 microbatches of 2.
config = GPTConfig(vocab=16, seq_len=8, hidden=16, heads=4, layers=8, dropout=0.1, tie_embeddings=True,
                   seed=7, dtype="float64")
B, m, v = 8, 4, 2
windows = numpy.random.default_rng(0).integers(0, config.vocab, (config.seq_len + 1, B))
ids, targets = backend.from_host(windows[:-1]), backend.from_host(windows[1:])  # (s, B): every rank the same
schedules = {"afab": 1, "1f1b": 1, "interleaved": v} if p > 1 else {"afab": 1, "1f1b": 1}
say(f"model: {config.layers} blocks, hidden {config.hidden}, vocabulary {config.vocab}, tied embeddings, "
    f"dropout {config.dropout}, float64; batch B={B} of s={config.seq_len} tokens, m={m} microbatches of {B // m}")

# ---------------------------------------------------------------------------------------------------
# 1. The stages.
#
# PipelineGPT(config, mesh) builds on each rank only its stage: blocks [r·L/p, (r+1)·L/p), the
# embeddings with block 0 and the final LayerNorm, head and loss with the last block. Each block draws
# its initial weights from (seed, name, index), so a stage's weights are the serial model's, and nobody
# builds the whole model. With tied embeddings the last stage keeps its own copy of the table; after
# backward the first and the last stage all-reduce its gradient (Megatron's embedding group).
# The interleaved schedule cuts the model into p·v chunks instead, and rank r holds chunks r, r+p, ...
# ---------------------------------------------------------------------------------------------------
say("\n1. The stages: what each rank holds")
try:  # 8 layers and 4 microbatches must split over the stages: every rank checks the same numbers
    models = {name: pipeline.PipelineGPT(config, mesh, virtual_stages=chunks) for name, chunks in schedules.items()}
    for name, chunks in schedules.items():
        pipeline.check_step(mesh, B, name, m, chunks)
except ValueError as error:  # ... so every rank stops here, together, before anything is sent
    say(f"{error}.\nThis tutorial runs on 1, 2 or 4 ranks: mpirun -n 4 python tutorials/pipeline.py")
    raise SystemExit(1)
serial_count = sum(parameter.size for parameter in GPT(config).parameters())
for chunks, model in ((1, models["1f1b"]), (v, models.get("interleaved"))):
    if model is None:
        continue
    say(f"   {chunks} chunk{'s' * (chunks > 1)} per rank:")
    each_rank(f"{model.holds()}  ({sum(q.size for q in model.parameters()):,} of the model's {serial_count:,} "
              "parameters)")

# ---------------------------------------------------------------------------------------------------
# 2. The schedules.
#
# A schedule is each rank's list of (F or B, microbatch, chunk) in time order (minitp.pipeline.schedules).
#   AFAB (GPipe): every forward, then every backward.
#   1F1B (PipeDream-flush): stage r runs p - r - 1 forwards ahead, then alternates F and B -- each
#       microbatch's activations are freed by its backward as soon as possible.
#   interleaved 1F1B: v chunks per rank, forwards in groups of p microbatches per chunk; each action
#       is 1/v of a stage's work, so the pipe fills v times faster. m must be a multiple of p.
# Replayed on a logical clock (clock.py), a stage's F and B taking 1 unit each, a chunk's 1/v: every
# stage is busy 2m units of a step of 2(m + p - 1) -- idle (p-1)/(m+p-1) -- for AFAB and 1F1B, and of
# 2(m + (p - 1)/v) interleaved -- idle (p-1)/(v·m+p-1): the same pipe, filled and drained v times faster.
# ---------------------------------------------------------------------------------------------------
say("\n2. The schedules: each rank's plan, then the timeline on a logical clock (a stage's F = B = 1, a chunk's 1/v)")
timelines = {}
for name, chunks in schedules.items():
    timeline = pipeline.replay(name, p, m, chunks, forward=Fraction(1, chunks), backward=Fraction(1, chunks))
    formula = pipeline.bubble_formula(name, p, m, chunks)
    timelines[f"{name}, p={p}, m={m}" + (f", v={chunks}" if chunks > 1 else "")] = timeline
    say(f"\n   {name}: plan of each rank")
    each_rank(pipeline.describe(pipeline.plan(name, p, m, chunks, stage), chunks))
    say(f"   timeline (· = waiting), {timeline.makespan} units:")
    for line in timeline.text().splitlines():
        say(f"     {line}")
    idle = {timeline.idle_fraction(r) for r in range(p)}
    say(f"   idle on every stage: {' '.join(map(str, idle))} of the step; the formula (p-1)/"
        f"({'v·' if chunks > 1 else ''}m+p-1) = {formula}")
picture = draw(timelines, arguments.picture, unit="time (a stage's F or B = 1)") if mesh.rank == 0 else None
say(f"\n   the timelines drawn: {picture}" if picture else "")

# ---------------------------------------------------------------------------------------------------
# 3. One step, on the wire.
#
# Each F but the first stage's receives the previous stage's output for that microbatch, (s, b/m, h),
# and each B but the last stage's receives the gradient of its output: shapes both sides compute from
# the configuration. Sends are posted non-blocking and only receives wait, so two neighbours that both
# send first (1F1B's steady state) never wait on each other (minitp.comm.p2p). After an output is sent
# its values are freed: backward needs the graph that made it, not its numbers (Megatron's deallocation).
# The loss lives on the last stage and is broadcast; the tied table's gradient is summed over the ends.
# ---------------------------------------------------------------------------------------------------
say("\n3. One 1F1B step on the wire: what each stage sends and receives")
runs, logs = {}, {}
for name, model in models.items():
    with comm.log_collectives() as log:
        runs[name] = pipeline.forward_backward(model, ids, targets, mesh, name, m)
        AllReduceGradients(model, mesh).finish()  # the tied table summed over the two ends (and dp)
    logs[name] = log
log, run = logs["1f1b"], runs["1f1b"]
each_rank(f"sends {log.count('send')} ({log.total_payload_bytes('send'):,} B), receives {log.count('recv')} "
          f"({log.total_payload_bytes('recv'):,} B); freed {run.freed_bytes:,} B of sent outputs; "
          f"tied table all-reduces: {log.count('all_reduce', 'tied embedding')}")

# ---------------------------------------------------------------------------------------------------
# 4. The activations each stage holds.
#
# Each forward runs under track_saved: the bytes its ops keep for backward (minitp.saved_bytes). A
# stage holds them from a microbatch's F until its B. AFAB holds all m on every stage; 1F1B at most
# min(p - r, m) on stage r -- so stage 0 holds p, and the last stage one; interleaved, its warm-up
# forwards plus one, 2(p - r - 1) + (v - 1)·p + 1, in chunks of 1/v of a stage. That is the price of
# its smaller bubble: at m = p the first stages run every forward before their first backward and
# hold as much as AFAB (Megatron's "all warm-up" case); with m > p the steady state lowers the peak.
# ---------------------------------------------------------------------------------------------------
say("\n4. The activations each stage holds at its peak (microbatch-chunks, bytes kept for backward)")
for name, chunks in schedules.items():
    expected = pipeline.expected_in_flight(name, p, m, chunks, stage)
    say(f"   {name}:")
    each_rank(f"{runs[name].peak_held} held (formula: {expected}), {runs[name].peak_bytes:,} B")

# ---------------------------------------------------------------------------------------------------
# The check: every schedule computed the serial step.
#
# The serial GPT runs the whole batch once. Its loss is the mean over all B·s tokens; the pipeline's is
# the mean of the m microbatch means (each microbatch's loss was scaled by 1/m in backward). Its dropout
# masks were drawn once for the whole batch; each microbatch drew its block of that one mask. Each
# stage's gradients must be the serial gradients of its parameters, the tied table's after the sum.
# ---------------------------------------------------------------------------------------------------
say("\nThe check: each schedule's loss and gradients vs the serial GPT's, max |error|")
serial = GPT(config)
serial_loss = F.cross_entropy(serial(ids), targets)
serial_loss.backward()
serial_grads = {name: q.grad for name, q in serial.named_parameters()}
worst = 0.0
for name, model in models.items():
    grads = gather_serial_grads(model, mesh.tp)
    error = max([abs(runs[name].loss - serial_loss.item())] +
                [max_error(grads[key], serial_grads[key]) for key in grads])
    error = mesh.world.comm.allreduce(error, op=MPI.MAX)
    covered = set().union(*mesh.world.comm.allgather(set(grads))) == set(serial_grads)
    say(f"   {name:12} {error:8.1e}   every parameter on some stage: {covered}")
    worst = max(worst, error if covered else float("inf"))
held_as_promised = all(runs[name].peak_held == pipeline.expected_in_flight(name, p, m, chunks, stage)
                       for name, chunks in schedules.items())
say("\nThe bubble shrinks as m grows (more microbatches per step) or v grows (smaller pieces), and 1F1B holds")
say("fewer activations than AFAB at the same bubble: that is why Megatron runs interleaved 1F1B.")
verdict(worst <= 1e-12 and held_as_promised,
        f"pipelined GPT == serial GPT, {', '.join(schedules)} (max error {worst:.1e}) on {ranks(p)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12); activations held as the schedules say: {held_as_promised}")
