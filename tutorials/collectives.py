"""The three collectives of tensor and sequence parallelism, and the conjugate operators built from them.

    mpirun -n 4 python tutorials/collectives.py        (any number of ranks works, 1 included)

Start here (after tutorials/autograd.py). Tensor parallelism moves data between ranks with three
collectives, and every sharded layer in minitp is built on them:

    1. all-reduce      every rank gets the elementwise sum of every rank's array
    2. all-gather      every rank gets every rank's array, concatenated in rank order
    3. reduce-scatter  the sum again, but rank r keeps only block r of it
    4. all-reduce = reduce-scatter + all-gather, in values and in the bytes a ring sends
    5. Megatron's f and f̄ (the paper's g): a copy and a sum, each the other's backward
    6. Korthikanti's g and ḡ: an all-gather and a reduce-scatter, each the other's backward
and ends with the check: the values are the sums and concatenations they should be, and every gradient
through f, f̄, g and ḡ equals the serial computation's.

Every rank runs this file, and speaks through minitp.report: say() prints once, from rank 0; each_rank()
gathers one line from every rank to rank 0, which prints them in rank order; verdict() ends the check,
on every rank together.
"""
import numpy
from mpi4py import MPI

from minitp import Tensor, backend, comm
from minitp.parallel import (copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                             reduce_from_tensor_parallel_region, reduce_scatter_to_sequence_parallel_region)
from minitp.report import banner, each_rank, indent, ranks, say, verdict
from minitp.testing import max_error

# The papers' symbols (Korthikanti et al. 2022 keep Megatron's f, rename its g to f̄, and call the sequence
# pair g and ḡ): the same functions as minitp.parallel.f, f_bar, g, g_bar.
f = copy_to_tensor_parallel_region
f_bar = reduce_from_tensor_parallel_region
g = gather_from_sequence_parallel_region
g_bar = reduce_scatter_to_sequence_parallel_region

# comm.init(tp=t) puts all ranks in one tensor-parallel group (mesh.tp), the group every collective below
# talks over: each call names it, so the code says which ranks talk. It also makes an exception on any rank abort the whole job with that rank's traceback,
# instead of leaving the others waiting in a collective forever.
mesh = comm.init(tp=MPI.COMM_WORLD.Get_size(), checked=True)
tp_size, rank = mesh.tp.size, mesh.tp.rank


def show(array, blocks=1):
    """The integer-valued ``array`` as "[0 1 | 2 3]": ``blocks`` equal blocks, split by bars."""
    values = [f"{v:g}" for v in backend.to_host(array).ravel()]
    width = len(values) // blocks
    return "[" + " | ".join(" ".join(values[i:i + width]) for i in range(0, len(values), width)) + "]"


banner(f"collectives and the conjugate operators on {ranks(tp_size)}")
worst = 0.0  # the largest error of any check below, on this rank

# ---------------------------------------------------------------------------------------------------
# 1. All-reduce: the sum, on every rank.
#
# Each rank holds its own small array: rank r's is 10r + [0, 1, ..., 2n-1] (n ranks, two numbers per rank,
# so that reduce-scatter in part 3 can hand each rank a block of two). After the all-reduce every rank
# holds the same array, the elementwise sum over the ranks. In tensor parallelism that sum adds the
# partial sums of a GEMM whose contraction dimension was split: X A = X_1 A_1 + ... + X_n A_n.
# The collectives return new arrays; the input stays as it was.
# ---------------------------------------------------------------------------------------------------
length = 2 * tp_size
x = 10.0 * rank + backend.xp.arange(length, dtype=numpy.float64)
say(f"\n1. All-reduce: each rank's x (10·rank + 0..{length - 1}) becomes the sum over the ranks, on every rank")
each_rank(f"x = {show(x)}")
reduced = comm.all_reduce(x, mesh.tp)
each_rank(f"all_reduce(x) = {show(reduced)}")
# Every rank knows what the sum must be without asking the others: Σ_r (10r + i) = 10·n(n-1)/2 + n·i.
expected_sum = 10.0 * tp_size * (tp_size - 1) / 2 + tp_size * backend.xp.arange(length, dtype=numpy.float64)
worst = max(worst, max_error(reduced, expected_sum))

# ---------------------------------------------------------------------------------------------------
# 2. All-gather: everything, on every rank, in rank order.
#
# Along axis 0 the n arrays are concatenated: block r of the result is rank r's x. In sequence parallelism
# this is how every rank gets the whole sequence back from the blocks of tokens the ranks hold.
# ---------------------------------------------------------------------------------------------------
say("\n2. All-gather (axis 0): every rank's x, concatenated in rank order, on every rank")
gathered = comm.all_gather(x, mesh.tp, axis=0)
each_rank(f"all_gather(x) = {show(gathered, tp_size)}")
expected_gather = backend.xp.concatenate([10.0 * r + backend.xp.arange(length, dtype=numpy.float64)
                                          for r in range(tp_size)])
worst = max(worst, max_error(gathered, expected_gather))

# ---------------------------------------------------------------------------------------------------
# 3. Reduce-scatter: the sum, but each rank keeps only its block.
#
# The same sum as the all-reduce, cut along axis 0 into n blocks; rank r keeps block r. The length of the
# axis must divide by n (here 2n: blocks of two). It moves half the bytes of an all-reduce (part 4).
# ---------------------------------------------------------------------------------------------------
say("\n3. Reduce-scatter (axis 0): the sum of the x's, and rank r keeps block r of it")
scattered = comm.reduce_scatter(x, mesh.tp, axis=0)
each_rank(f"reduce_scatter(x) = {show(scattered)}  (block {rank} of {show(reduced, tp_size)})")
worst = max(worst, max_error(scattered, comm.split(expected_sum, mesh.tp, axis=0)))

# ---------------------------------------------------------------------------------------------------
# 4. All-reduce = reduce-scatter, then all-gather.
#
# After a reduce-scatter each rank owns the finished sum of one block; an all-gather then gives every rank
# every block: the whole sum, which is what an all-reduce gives. That is not only an identity of values:
# it is how the ring all-reduce works. In a ring of n ranks, the reduce-scatter passes n-1 blocks of S/n
# around the ring, adding as it goes, and the all-gather passes n-1 finished blocks more:
#       all-reduce  2(n-1)/n · S  =  (n-1)/n · S  reduce-scatter  +  (n-1)/n · S  all-gather
# bytes sent by each rank, S the full buffer. So when sequence parallelism (Korthikanti et al. 2022)
# replaces each of tensor parallelism's all-reduces with a reduce-scatter and an all-gather -- and does
# work on the sequence block in between -- it sends exactly the same bytes.
# The log records each collective as this rank sees it: the full buffer S ("payload") and the ring bytes.
# ---------------------------------------------------------------------------------------------------
say("\n4. All-reduce = all-gather(reduce-scatter(x)): the same values, the same ring bytes")
with comm.log_collectives() as one_step:
    reduced = comm.all_reduce(x, mesh.tp)
with comm.log_collectives() as two_steps:
    rebuilt = comm.all_gather(comm.reduce_scatter(x, mesh.tp, axis=0), mesh.tp, axis=0)
both_agree = max_error(rebuilt, reduced)
worst = max(worst, both_agree)
each_rank(f"all_gather(reduce_scatter(x)) = {show(rebuilt)}  differs from all_reduce(x) by {both_agree:.1e}")
say("   all_reduce(x):")
say(indent(one_step.table()))
say("   all_gather(reduce_scatter(x)):")
say(indent(two_steps.table()))
payload = x.nbytes
all_reduce_ring = one_step.total_ring_bytes()
scatter_ring, gather_ring = two_steps.total_ring_bytes("reduce_scatter"), two_steps.total_ring_bytes("all_gather")
say(f"   S = {length}·8 = {payload} B; ring bytes per rank: all-reduce 2(n-1)/n·S = {all_reduce_ring:g} B "
    f"== reduce-scatter {scatter_ring:g} B + all-gather {gather_ring:g} B")
ring_bytes_agree = (all_reduce_ring == 2 * (tp_size - 1) / tp_size * payload == scatter_ring + gather_ring
                    and scatter_ring == gather_ring)

# ---------------------------------------------------------------------------------------------------
# 5. f and f̄: a copy and a sum, each the other's backward (Shoeybi et al. 2019, section 3).
#
# A tensor-parallel region starts with f and ends with f̄ (Megatron's "g"). Inside it each rank works on
# its own shard of the weights. The smallest such region: a replicated x enters through f, each rank
# multiplies it by its own weight w_r, and f̄ sums the products, so every rank holds
#       z = x·w_1 + x·w_2 + ... + x·w_n
# Forward, f is the identity (x is already on every rank) and f̄ is an all-reduce. Backward it is the
# other way round, and the chain rule says why in three lines each:
#
#   f̄:  y = x_1 + ... + x_n            (x_i: rank i's partial sum; y on every rank)
#       dL/dx_i = dL/dy · dy/dx_i = dL/dy
#       so f̄'s backward is the identity: the backward of a sum is a copy.
#
#   f:  x_1 = x_2 = ... = x_n = x       (one x, a copy on every rank, each used by its rank's shard)
#       dL/dx = Σ_i dL/dx_i · dx_i/dx = Σ_i dL/dx_i
#       so f's backward is an all-reduce: the backward of a copy is a sum.
#
# f's backward needs one thing to be true: the gradient arriving at f̄'s output, dL/dz, is the same on
# every rank (a replicated tensor gets a replicated gradient). Megatron keeps that invariant everywhere.
#
# The check: the serial computation holds all n weights, W (n, s, h), and computes z = Σ_r x·W[r] with the
# engine's broadcasting -- whose backward, reduced over the broadcast axis, is itself "a copy's backward
# is a sum". Every rank runs it on the same numbers, and compares its own results with it.
# ---------------------------------------------------------------------------------------------------
seq, hidden = 2 * tp_size, 3  # the sequence divides by n for part 6; hidden = 3 is just small
rng = numpy.random.default_rng(0)  # the same seed on every rank: the same x, W and dL/dz everywhere
x_values = backend.from_host(rng.standard_normal((seq, hidden)))
weights = backend.from_host(rng.standard_normal((tp_size, seq, hidden)))
grad_z = backend.from_host(rng.standard_normal((seq, hidden)))  # dL/dz from the layers above: replicated

x_serial, w_serial = Tensor(x_values, requires_grad=True), Tensor(weights, requires_grad=True)
z_serial = (x_serial * w_serial).sum(axis=0)  # (s, h) * (n, s, h) -> (n, s, h) -> (s, h)
z_serial.backward(grad_z)

say(f"\n5. f and f̄ (Megatron's f and g): z = f̄(f(x) · w_r), x (s, h) = {tuple(x_values.shape)} replicated, "
    f"w_r rank r's own weight")
say("   f̄ forward:  y = x_1 + ... + x_n           (x_i: rank i's partial sum; y on every rank)")
say("     chain rule: dL/dx_i = dL/dy · dy/dx_i = dL/dy")
say("     so the backward of a sum is a copy: f̄'s backward is the identity")
say("   f forward:   x_1 = x_2 = ... = x_n = x       (one x, a copy on every rank, each used by its shard)")
say("     chain rule: dL/dx = Σ_i dL/dx_i · dx_i/dx = Σ_i dL/dx_i")
say("     so the backward of a copy is a sum: f's backward is an all-reduce")
x_tp = Tensor(x_values, requires_grad=True)
w_tp = Tensor(backend.xp.ascontiguousarray(weights[rank]), requires_grad=True)
with comm.log_collectives() as f_forward:
    z_tp = f_bar(f(x_tp, mesh.tp) * w_tp, mesh.tp)
with comm.log_collectives() as f_backward:
    z_tp.backward(grad_z)
f_errors = {"z": max_error(z_tp, z_serial), "dL/dx": max_error(x_tp.grad, x_serial.grad),
            "dL/dw_r": max_error(w_tp.grad, w_serial.grad[rank])}
worst = max(worst, *f_errors.values())
say("   forward:  " + ", ".join(f"{r.op} ({r.tag})" for r in f_forward)
    + "   backward: " + ", ".join(f"{r.op} ({r.tag})" for r in f_backward))
each_rank("vs serial: " + ", ".join(f"{name} {error:.1e}" for name, error in f_errors.items()))

# What f's all-reduce is for: the same region without f. Each rank's x then receives only its own term,
# dL/dz · w_r, not the sum over the ranks -- wrong on every rank as soon as there are two.
x_without_f = Tensor(x_values, requires_grad=True)
f_bar(x_without_f * w_tp, mesh.tp).backward(grad_z)
missing_terms = mesh.world.comm.allreduce(max_error(x_without_f.grad, x_serial.grad), op=MPI.MAX)
say(f"   without f, dL/dx = dL/dz · w_r misses the other ranks' terms: max error {missing_terms:.1e}"
    + (" (one rank: nothing is missing)" if tp_size == 1 else ""))
f_is_needed = tp_size == 1 or missing_terms > 1e-3

# ---------------------------------------------------------------------------------------------------
# 6. g and ḡ: an all-gather and a reduce-scatter, each the other's backward (Korthikanti et al. 2022).
#
# Sequence parallelism keeps the activations outside the tensor-parallel region split by sequence: rank r
# holds tokens [r·s/n, (r+1)·s/n). So the region starts with g (all-gather the sequence: each rank needs all
# of x for its shard) and ends with ḡ (reduce-scatter: sum the partial products, keep my tokens). The
# same computation as part 5, with x and z sharded by sequence:
#       z_r = block r of (x·w_1 + ... + x·w_n),   from x_r = block r of x
# The same chain rule, block by block:
#
#   g:  y^(i) = [x_1 | ... | x_n] on every rank i   (block r of every rank's y is a copy of x_r)
#       dL/dx_r = Σ_i dL/dy^(i)[block r]             (the backward of a copy is a sum)
#       so g's backward sums over the ranks and keeps block r: a reduce-scatter.
#
#   ḡ:  z_r = (y_1 + ... + y_n)[block r]             (y_i: rank i's partial sum, all s tokens)
#       dL/dy_i[block r] = dL/dz_r, for every i      (the backward of a sum is a copy)
#       so every rank needs dL/dz_r of every block r: an all-gather.
#
# Part 4 again: g/ḡ's all-gather + reduce-scatter each way send the bytes of f/f̄'s all-reduce.
# ---------------------------------------------------------------------------------------------------
say(f"\n6. g and ḡ (sequence parallelism): z_r = ḡ(g(x_r) · w_r), x_r rank r's {seq // tp_size} tokens of x")
say("   g forward:  y^(i) = [x_1 | ... | x_n] on every rank i   (block r of each y^(i) is a copy of x_r)")
say("     chain rule: dL/dx_r = Σ_i dL/dy^(i)[block r]")
say("     so g's backward sums over the ranks and keeps block r: a reduce-scatter")
say("   ḡ forward:  z_r = (y_1 + ... + y_n)[block r]          (y_i: rank i's partial sum, all s tokens)")
say("     chain rule: dL/dy_i[block r] = dL/dz_r, for every i and every block r")
say("     so each rank needs dL/dz_r of every block r: ḡ's backward is an all-gather")
tokens = seq // tp_size
x_sp = Tensor(backend.xp.ascontiguousarray(comm.split(x_values, mesh.tp, axis=0)), requires_grad=True)
w_sp = Tensor(backend.xp.ascontiguousarray(weights[rank]), requires_grad=True)
with comm.log_collectives() as g_forward:
    gathered_x = g(x_sp, mesh.tp)
    z_sp = g_bar(gathered_x * w_sp, mesh.tp)
with comm.log_collectives() as g_backward:
    z_sp.backward(comm.split(grad_z, mesh.tp, axis=0))  # each rank holds dL/dz for its own tokens only
each_rank(f"tokens {rank * tokens}-{(rank + 1) * tokens - 1}: x_r {x_sp.shape} --g--> {gathered_x.shape}, "
          f"· w_r --ḡ--> z_r {z_sp.shape}")
g_errors = {"z_r": max_error(z_sp, comm.split(z_serial.data, mesh.tp, axis=0)),
            "dL/dx_r": max_error(x_sp.grad, comm.split(x_serial.grad, mesh.tp, axis=0)),
            "dL/dw_r": max_error(w_sp.grad, w_serial.grad[rank])}
worst = max(worst, *g_errors.values())
say("   forward:  " + ", ".join(f"{r.op} ({r.tag})" for r in g_forward)
    + "   backward: " + ", ".join(f"{r.op} ({r.tag})" for r in g_backward))
each_rank("vs serial: " + ", ".join(f"{name} {error:.1e}" for name, error in g_errors.items()))
f_ring = f_forward.total_ring_bytes() + f_backward.total_ring_bytes()
g_ring = g_forward.total_ring_bytes() + g_backward.total_ring_bytes()
say(f"   ring bytes per rank, forward + backward: f/f̄ {f_ring:g} B (2 all-reduces), "
    f"g/ḡ {g_ring:g} B (2 all-gathers + 2 reduce-scatters)")
ring_bytes_agree = ring_bytes_agree and f_ring == g_ring


def ops(log):
    return sorted(record.op for record in log)


collectives_as_designed = (ops(f_forward) == ops(f_backward) == ["all_reduce"]
                           and ops(g_forward) == ops(g_backward) == ["all_gather", "reduce_scatter"])

# ---------------------------------------------------------------------------------------------------
# The check. Every rank measured its own errors; an all-reduce of the worst (and of the yes/no answers)
# gives every rank the same verdict, so that on failure every rank stops with exit status 1 together.
# ---------------------------------------------------------------------------------------------------
worst = mesh.world.comm.allreduce(worst, op=MPI.MAX)
say("\nnext: mpirun -n 4 python tutorials/mlp.py (f and f̄ around the Megatron MLP: one all-reduce each way)")
verdict(worst <= 1e-12 and ring_bytes_agree and collectives_as_designed and f_is_needed,
        f"all-reduce == all-gather(reduce-scatter); f, f̄, g, ḡ gradients == serial "
        f"(max error {worst:.1e}) on {ranks(tp_size)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12), ring bytes agree: {ring_bytes_agree}, "
                f"collectives as designed: {collectives_as_designed}, f's all-reduce needed: {f_is_needed}")
