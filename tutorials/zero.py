"""ZeRO-1, 2 and 3: the optimizer state, then the gradients, then the parameters cut into d slices; the
bytes of one all-reduce (1.5 for stage 3), and the gradient reductions hidden behind backward.

    mpirun -n 4 python tutorials/zero.py                  (any number of ranks; 4 shows it best, 3 the padding)
    mpirun -n 4 python tutorials/zero.py --png zero.png   (also draw the timeline as a picture)

After tutorials/train_gpt.py. Every rank below is a data-parallel replica of one small GPT (tp = 1,
dp = the ranks), each on its slice of the batch, and the story is what the replicas keep and send:

    1. plain data parallelism keeps d copies of AdamW's two moments; ZeRO-1 keeps one, cut into d slices
    2. reduce-scatter + all-gather moves the bytes of the one all-reduce it replaces -- exactly when d
       divides every bucket, else plus the padding that makes it divide
    3. the timeline: each bucket's reduction starts inside backward, behind the layers still to come
    4. ZeRO-2: each bucket reduce-scattered inside backward, so the whole gradient never outlives it
    5. ZeRO-3: what a rank holds before, during and after a block's forward and backward
and ends with the check: after several AdamW steps in float64, ZeRO-1's parameters are plain data
parallelism's (the same numbers, summed in another order), with 1/d of the state and the bytes of
the formulas below, counted by hand from the bucket sizes and checked against the collective log.
"""
import argparse
import math

import numpy
from mpi4py import MPI

from minitp import comm, trace_report
from minitp.nn import AdamW, GPTConfig
from minitp.parallel.data.sync import AllReduceGradients
from minitp.training import train_step
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.tensor.shard import gather_serial_state
from minitp.parallel.data.zero import ZeroOptimizer
from minitp.parallel.data.zero3 import FullyShardedOptimizer
from minitp.report import banner, each_rank, indent, ranks, say, verdict

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--png", metavar="FILE", help="draw the timeline of part 3 into this PNG (needs matplotlib)")
options = parser.parse_args()

# A GPT small enough to train in seconds and big enough that backward takes some milliseconds per layer.
# float64, so that "the same numbers" can be checked to the last digits. Its ~0.2 M parameters make
# 1.6 MB of float64 gradients: 64 KiB buckets give a few dozen of them, several per layer.
CONFIG = GPTConfig(vocab=64, seq_len=32, hidden=64, heads=4, layers=4, dropout=0.1, seed=3, dtype="float64")
BUCKET_BYTES = 64 * 1024
STEPS = 3
world = MPI.COMM_WORLD.Get_size()
mesh = comm.init(tp=1, dp=world)
d = mesh.dp_size
BATCH = 4 * d  # the global batch: 4 sequences per replica


def batch_at(step):
    """The global batch of step ``step`` (s, B): the same on every rank; each replica takes its columns."""
    windows = numpy.random.default_rng([11, step]).integers(0, CONFIG.vocab, (CONFIG.seq_len + 1, BATCH))
    return windows[:-1], windows[1:]


def plain():
    """A model and a plain AdamW; its gradients all-reduced in buckets, started during backward."""
    model = ParallelGPT(CONFIG, mesh)
    optimizer = AdamW(model.named_parameters(), lr=1e-3)
    return model, optimizer, AllReduceGradients(model, mesh, BUCKET_BYTES, overlap=True)


def zero():
    """The same model; AdamW sharded by ZeRO-1, whose reduce-scatters also start during backward."""
    model = ParallelGPT(CONFIG, mesh)
    optimizer = ZeroOptimizer(AdamW(model.named_parameters(), lr=1e-3), mesh, BUCKET_BYTES, overlap=True)
    return model, optimizer, None


def train(model, optimizer, gradients, steps, first=0):
    return [train_step(model, optimizer, *batch_at(step), mesh, max_norm=1.0, gradients=gradients)[0]
            for step in range(first, first + steps)]


banner(f"ZeRO-1 over {ranks(d)} (dp = {d}, tp = 1)")
plain_model, plain_optimizer, plain_buckets = plain()
zero_model, zero_optimizer, _ = zero()
parameters = sum(p.size for p in plain_model.parameters())

# ---------------------------------------------------------------------------------------------------
# 1. What each replica keeps.
#
# AdamW keeps two numbers per parameter, the moments m and v: 2Ψ numbers for Ψ parameters, twice the
# model itself. Every replica of plain data parallelism holds all of them, and every replica computes
# the very same update with them: d copies of one computation. ZeRO-1 (Rajbhandari et al. 2020) cuts
# the flat gradient buckets into d contiguous slices; replica r keeps the moments of slice r only and
# updates only those parameters, then the replicas exchange the updated slices. The state per rank
# falls by d; the parameters and gradients stay whole (that is ZeRO-2 and -3).
#
# The padding rule: so that d divides it, a bucket of n elements is padded at its end with zeros to
# d·⌈n/d⌉, and rank r owns [r·⌈n/d⌉, (r+1)·⌈n/d⌉). The padding has no parameter, so no moments: rank r
# keeps min(⌈n/d⌉, max(0, n - r·⌈n/d⌉)) elements of each moment per bucket -- ⌈n/d⌉ on all but the
# last ranks, and over the d ranks exactly n, plain's state once.
# ---------------------------------------------------------------------------------------------------
say(f"\n1. Optimizer state per rank: {parameters:,} parameters, float64, AdamW's exp_avg and exp_avg_sq")
train(plain_model, plain_optimizer, plain_buckets, 1)
train(zero_model, zero_optimizer, None, 1)
plain_bytes = plain_optimizer.state_bytes()
zero_bytes = zero_optimizer.state_bytes()
# By hand, from the bucket sizes n (each bucket's parameters' elements) and the padding rule alone:
sizes = [sum(p.size for p in bucket.parameters) for bucket in zero_optimizer.gradients.buckets]
share = [-(-n // d) for n in sizes]  # ⌈n/d⌉: each rank's slice of each bucket
padded = [d * k for k in share]  # d·⌈n/d⌉: the bucket with its padding
padding = sum(padded) - sum(sizes)
ITEMSIZE, MOMENTS = 8, 2  # float64; exp_avg and exp_avg_sq
by_hand = MOMENTS * ITEMSIZE * sum(min(k, max(0, n - mesh.dp_rank * k)) for n, k in zip(sizes, share))
each_rank(f"plain {plain_bytes:>10,} B   ZeRO-1 {zero_bytes:>9,} B   = 1/{plain_bytes / zero_bytes:.2f} of plain"
          f"   (by hand: {by_hand:,} B)")
total = mesh.dp.comm.allreduce(zero_bytes)
say(f"   over the {d} replicas ZeRO-1 holds {total:,} B: plain's {plain_bytes:,} B once, not {d} times. "
    f"Each bucket is padded to a multiple of d = {d} ({padding} padding elements in "
    f"{len(zero_optimizer.gradients)} buckets); padding has no parameter, so no state.")
memory_as_claimed = (total == plain_bytes == MOMENTS * ITEMSIZE * parameters and zero_bytes == by_hand
                     and (padding > 0 or zero_bytes * d == plain_bytes))

# ---------------------------------------------------------------------------------------------------
# 2. What crosses the wire.
#
# Plain data parallelism all-reduces each bucket of S bytes: a ring all-reduce sends 2(d-1)/d·S per
# rank -- it IS a reduce-scatter, (d-1)/d·S, followed by an all-gather, (d-1)/d·S (tutorials/
# collectives.py, part 4). ZeRO-1 splits those two halves apart and puts the optimizer between them:
#     reduce-scatter the gradients   rank r receives the finished sum of its slice, all it needs to update
#     update the slice
#     all-gather the parameters      every rank receives every updated slice
# The same two halves, so the same bytes: the memory comes for free. The log of one step shows it.
#
# Exactly the same bytes when d divides every bucket. Otherwise ZeRO-1 reduce-scatters and all-gathers
# the padded bucket, d·⌈n/d⌉ elements of 8 B, while the all-reduce sends the n elements alone. Per rank,
# summed over the buckets:
#     all-reduce                    2(d-1)/d · Σ n · 8 B
#     reduce-scatter = all-gather    (d-1)/d · Σ d·⌈n/d⌉ · 8 B   = (d-1) · Σ ⌈n/d⌉ · 8 B, a whole number
#     so  reduce-scatter + all-gather = all-reduce + 2(d-1)/d · (padding) · 8 B
# with padding = Σ (d·⌈n/d⌉ - n) < d per bucket: 0 at d = 1, 2 and 4 here (even buckets), some
# elements at d = 3. Both are computed below from the bucket sizes and compared with the log.
# ---------------------------------------------------------------------------------------------------
say("\n2. The bytes of one step over dp, from the collective log")
with comm.log_collectives() as plain_log:
    train(plain_model, plain_optimizer, plain_buckets, 1, first=1)
with comm.log_collectives() as zero_log:
    train(zero_model, zero_optimizer, None, 1, first=1)


def reductions(log, op):
    return [r for r in log if r.op == op and ("gradients" in r.tag or "parameters" in r.tag)]


all_reduce = sum(r.ring_bytes for r in reductions(plain_log, "all_reduce"))
scatter = sum(r.ring_bytes for r in reductions(zero_log, "reduce_scatter"))
gather = sum(r.ring_bytes for r in reductions(zero_log, "all_gather"))
say(f"   plain: {len(reductions(plain_log, 'all_reduce'))} all-reduces of gradient buckets; "
    f"ZeRO-1: {len(reductions(zero_log, 'reduce_scatter'))} reduce-scatters of gradients and "
    f"{len(reductions(zero_log, 'all_gather'))} all-gathers of parameters. The last bucket (the first "
    "reduced: backward starts at the top) of each:")
last = f"(bucket {len(zero_optimizer.gradients)}/{len(zero_optimizer.gradients)})"
one_bucket = comm.CollectiveLog()
one_bucket.records = [r for op in ("all_reduce", "reduce_scatter", "all_gather")
                      for r in reductions(plain_log if op == "all_reduce" else zero_log, op) if last in r.tag]
say(indent(one_bucket.table()))
# The formulas, from the bucket sizes alone. The log's all-reduce figure 2(d-1)/d·S need not be a
# whole number of bytes, and is summed in floating point: equal to the formula within rounding (1e-12
# relative); the reduce-scatter's and all-gather's are whole numbers, equal exactly.
formula_all_reduce = 2 * (d - 1) * sum(sizes) * ITEMSIZE / d
formula_half = (d - 1) * sum(share) * ITEMSIZE  # (d-1)/d · Σ d·⌈n/d⌉ · 8
padding_share = 2 * (d - 1) * padding * ITEMSIZE / d
say(f"   ring bytes per rank: all-reduce {all_reduce:,.0f} B;  reduce-scatter {scatter:,.0f} B + all-gather "
    f"{gather:,.0f} B = {scatter + gather:,.0f} B" + (f" (the padding's share: {padding_share:,.1f} B)" if padding else ""))
say(f"   by hand, d = {d}, Σ n = {sum(sizes):,} elements in {len(sizes)} buckets, Σ d·⌈n/d⌉ = {sum(padded):,} "
    f"(padding {padding}):\n"
    f"     all-reduce 2(d-1)/d · Σ n · 8 = {formula_all_reduce:,.1f} B;  reduce-scatter = all-gather "
    f"(d-1)/d · Σ d·⌈n/d⌉ · 8 = {formula_half:,} B;  2(d-1)/d · padding · 8 = {padding_share:,.1f} B")
bytes_as_claimed = (scatter == gather == formula_half
                    and math.isclose(all_reduce, formula_all_reduce, rel_tol=1e-12, abs_tol=1e-9)
                    and math.isclose(scatter + gather, all_reduce + padding_share, rel_tol=1e-12, abs_tol=1e-9))

# ---------------------------------------------------------------------------------------------------
# 3. The timeline: reductions hidden behind backward.
#
# Backward produces the gradients last layer first. The engine calls a hook the moment a parameter's
# gradient is final; when every gradient of a bucket is in, the bucket's reduce-scatter STARTS
# (non-blocking) and backward goes on into the layers below while the bytes travel. Only before the
# optimizer does the rank wait. An MPI library moves a non-blocking collective's bytes only inside MPI
# calls, so a progress thread keeps testing the requests in flight (minitp/comm/nonblocking.py: without
# it, this MPICH leaves nearly all the work to the final wait).
#
# comm.record_timeline records every rank's ops, collectives and requests in flight; trace_report reads
# it. Below, one step per rank: F forward, B backward, O optimizer; █ an op computing; ─ a reduction in
# flight while the rank computes; ▓ the rank blocked, waiting for one.
# ---------------------------------------------------------------------------------------------------
say("\n3. One ZeRO-1 step, traced on every rank (text below; --png draws it)")
with comm.record_timeline(mesh) as timeline:
    train(zero_model, zero_optimizer, None, 2, first=2)
if timeline.trace is not None:  # rank 0 holds every rank's timeline
    say(indent(trace_report.text_timeline(timeline.trace, step=1, tag="gradients")))
    say("   both traced steps, per rank (exposed comm: communication with no op running behind it):")
    say(indent(trace_report.table(trace_report.breakdown(timeline.trace))))
    rows = trace_report.breakdown(timeline.trace, tag="gradients")
    hidden = sum(r.hidden for r in rows) / max(sum(r.hidden + r.communication for r in rows), 1e-9)
    say(f"   the gradient reduce-scatters alone: {100 * hidden:.0f}% of the time one was in flight, its rank "
        "was computing. A bucket completes only when the slowest replica has started it too, so what is "
        "left is mostly waiting for that replica. (Timings on a busy machine move from run to run; with "
        "more ranks than cores they mostly measure waiting for descheduled neighbours.)")
    if options.png:
        trace_report.plot(timeline.trace, options.png, step=1, tag="gradients",
                          title=f"ZeRO-1 over {d} ranks: gradient reduce-scatters during backward")
        say(f"   drew {options.png}")

# ---------------------------------------------------------------------------------------------------
# 4. ZeRO-2: the gradients sharded too.
#
# The paper's stage 1 keeps the whole gradient until the step (2Ψ bytes in fp16), stage 2 only its
# slice. minitp's ZeRO-1 above already reduce-scatters, so after the reduction both keep 1/d; what
# differs is when the whole gradient dies. Stage 1 keeps every .grad until backward is over and only then
# packs and reduce-scatters; stage 2 (ZeroOptimizer(..., stage=2)) reduce-scatters each bucket from
# backward's hooks the moment it is complete and drops its .grad there. Measured at the end of backward
# (when finish() begins): the .grad arrays alive plus the slices already reduced.
# ---------------------------------------------------------------------------------------------------
say("\n4. ZeRO-2: the gradient alive at the end of backward, per rank (float64)")


def gradient_at_end_of_backward(stage):
    model = ParallelGPT(CONFIG, mesh)
    optimizer = ZeroOptimizer(AdamW(model.named_parameters(), lr=1e-3), mesh, BUCKET_BYTES, stage=stage)
    seen, finish = {}, optimizer.finish

    def measured():
        alive = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        seen["bytes"] = alive + sum(g.nbytes for g in optimizer.gradients.grad_shards if g is not None)
        return finish()
    optimizer.finish = measured
    train(model, optimizer, None, 1)
    return seen["bytes"]


stage1, stage2 = gradient_at_end_of_backward(1), gradient_at_end_of_backward(2)
say(f"   stage 1: {stage1:,} B (Ψ·8 = {parameters * ITEMSIZE:,}: the whole gradient);  stage 2: {stage2:,} B "
    f"(Σ⌈n/d⌉·8 = {sum(share) * ITEMSIZE:,}: its slices)")
gradients_as_claimed = stage1 == parameters * ITEMSIZE and stage2 == sum(share) * ITEMSIZE

# ---------------------------------------------------------------------------------------------------
# 5. ZeRO-3: the parameters sharded too (FullyShardedOptimizer; FSDP).
#
# Each unit -- the embeddings, each transformer block, the head -- is one flat buffer of its parameters,
# and rank r keeps only its slice. A unit is gathered before its forward and freed after it, gathered
# again before its backward (the identity op on its output: its backward runs before any of the unit's
# ops) and freed when its gradients are final, which are then reduce-scattered. Below, what one rank
# holds around block 1: its slices between steps, + block 1 whole while block 1 computes, nothing else.
# Per step that sends 3 · (d-1)/d · Σ d·⌈n/d⌉ · 8 B (gather, gather, reduce-scatter): 1.5 all-reduces.
# ---------------------------------------------------------------------------------------------------
say("\n5. ZeRO-3: parameter bytes held by rank 0 around block 1's forward and backward")
fsdp_model = ParallelGPT(CONFIG, mesh)
fsdp = FullyShardedOptimizer(AdamW(fsdp_model.named_parameters(), lr=1e-3), fsdp_model, mesh)
moments = []
block = fsdp_model.blocks[1]
block.register_forward_pre_hook(lambda *_: moments.append(("block 1 forward begins", fsdp.held_bytes())))
block.register_forward_hook(lambda *_: moments.append(("block 1 forward ended", fsdp.held_bytes())))
first_weight = block.parameters()[-1]  # its gradient is the first of block 1's to be final
first_weight.register_post_accumulate_grad_hook(lambda p: moments.append(("block 1 backward", fsdp.held_bytes())))
moments.append(("before the step", fsdp.held_bytes()))
with comm.log_collectives() as fsdp_log:
    train(fsdp_model, fsdp, None, 1)
moments.append(("after the step", fsdp.held_bytes()))
slices = sum(a.nbytes for a in fsdp.gradients.shards)
unit = fsdp.gradients.buckets[2].padded * ITEMSIZE  # blocks.1 is unit 2, after the embeddings and block 0
for moment, held in moments:
    say(f"   {moment:24s} {held:>9,} B" + (f"  = its slices + block 1 whole ({unit:,} B)" if held > slices else
                                            "  = its slices only"))
units_padded = sum(b.padded for b in fsdp.gradients.buckets)
wire = sum(r.ring_bytes for r in fsdp_log if r.group == "dp" and r.tag.startswith(("gradients", "parameters")))
say(f"   ZeRO-3 sent {wire:,.0f} B on dp; by hand 3 · (d-1)/d · Σ d·⌈n/d⌉ · 8 = "
    f"{3 * (d - 1) * units_padded * ITEMSIZE / d:,.0f} B ({wire / max(all_reduce, 1e-9):.3f}× plain's all-reduce)")
held_as_claimed = (all(held in (slices, slices + unit) for _, held in moments)
                   and [held > slices for _, held in moments] == [False, True, False, True, False]
                   and math.isclose(wire, 3 * (d - 1) * units_padded * ITEMSIZE / d, rel_tol=1e-12, abs_tol=1e-9))
say("   memory per rank, float64 (Ψ parameters; 2Ψ moments):  stage 0  Ψ+Ψ+2Ψ   stage 1  Ψ+Ψ+2Ψ/d   "
    "stage 2  Ψ+Ψ/d+2Ψ/d   stage 3  (Ψ+Ψ+2Ψ)/d  (+ padding; benchmarks/results/zero.md measures them)")

# ---------------------------------------------------------------------------------------------------
# The check. Train a fresh pair for several steps, plain and ZeRO-1, and compare every parameter. AdamW
# is elementwise, so updating a slice is updating those elements; what differs is only the order in
# which MPI adds the replicas' gradients (reduce-scatter vs all-reduce): rounding, ~1e-16.
# ---------------------------------------------------------------------------------------------------
say(f"\nThe check: {STEPS} more steps of each, plain and ZeRO-1, every parameter compared")
train(plain_model, plain_optimizer, plain_buckets, 2, first=2)  # the steps ZeRO-1 took in part 3
train(plain_model, plain_optimizer, plain_buckets, STEPS, first=4)
train(zero_model, zero_optimizer, None, STEPS, first=4)
expected, actual = gather_serial_state(plain_model, mesh.tp), gather_serial_state(zero_model, mesh.tp)
error = max(float(numpy.abs(actual[name] - expected[name]).max()) for name in expected)
# stages 2 and 3 from the start, the same 4 + STEPS steps
stage2_model = ParallelGPT(CONFIG, mesh)
stage2 = ZeroOptimizer(AdamW(stage2_model.named_parameters(), lr=1e-3), mesh, BUCKET_BYTES, overlap=True, stage=2)
train(stage2_model, stage2, None, 4 + STEPS)
stage3_model = ParallelGPT(CONFIG, mesh)
stage3 = FullyShardedOptimizer(AdamW(stage3_model.named_parameters(), lr=1e-3), stage3_model, mesh, overlap=True)
train(stage3_model, stage3, None, 4 + STEPS)
with stage3.full_parameters():
    stage3_state = gather_serial_state(stage3_model, mesh.tp)
for state in (gather_serial_state(stage2_model, mesh.tp), stage3_state):
    error = max([error] + [float(numpy.abs(state[name] - expected[name]).max()) for name in expected])
each_rank(f"max |ZeRO-1 - plain| over every parameter: {error:.1e}")
worst = mesh.world.comm.allreduce(error, op=MPI.MAX)
claims = {"state per rank 1/d (by hand, padding counted), all ranks together = plain": memory_as_claimed,
          "reduce-scatter + all-gather bytes = all-reduce bytes + the padding's": bytes_as_claimed,
          "stage 1 holds the whole gradient at the end of backward, stage 2 its slices": gradients_as_claimed,
          "stage 3 holds its slices, + one unit while it computes; 3 halves of an all-reduce": held_as_claimed}
failed = [claim for claim, holds in claims.items() if not mesh.world.comm.allreduce(holds, op=MPI.LAND)]
verdict(worst <= 1e-12 and not failed,
        f"ZeRO-1 == plain data parallelism (max error {worst:.1e} after {STEPS + 4} steps; state 1/{d} per rank, "
        f"the bytes of one all-reduce{' plus the padding' if padding else ''}), and so do ZeRO-2 (gradient 1/{d} "
        f"at the end of backward) and ZeRO-3 (parameters 1/{d} + one block, 1.5 all-reduces) on {ranks(d)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12); claims that do not hold: {failed}")
