"""The transformer's MLP split over MPI ranks, both ways a learner's notebook tries, proven equal to the serial MLP.

    mpirun -n 4 python tutorials/mlp.py          (1, 2 or 3 ranks work too; `make tutorial` runs this)

The MLP block is Z = Dropout(GeLU(X A) B), with X (s, b, h) the activations, A (h, ffn) and B (ffn, h) the
weights. Tensor parallelism gives each of t ranks 1/t of A and B, so each holds 1/t of the weights and does
1/t of the multiplications. The question is how to cut A, and a learner's notebook on tensor parallelism
(its part "Tensor Parallelism", two "GPUs" simulated with torch tensors, forward only) tries both answers
(Shoeybi et al. 2019, "Megatron-LM", section 3):

    Part 1. cut A by rows (the contraction dimension): every rank gets a partial sum of X A, and the
            partial sums must be added before the GeLU -- a sync point in the middle of the block;
    Part 2. cut A by columns and B by rows (Megatron): GeLU runs on each rank's own columns, and the
            only communication is one all-reduce forward and one backward. Written out with the
            library's operators first -- f̄(GeLU(f(X) A_r + b1_r) B_r) + b2 -- then as the module.

Both parts then prove the claim: the sharded output and every gradient equal the serial MLP's in float64.

Every rank runs this same file. Rank 0 prints (minitp.report.say); what each rank holds is gathered to
rank 0 first (each_rank), so the lines come out in rank order. Each printed line is explained in the comment
just above the code printing it.
"""
import numpy
from mpi4py import MPI

from minitp import Tensor, backend, comm
from minitp import functional as F
from minitp.nn import MLP
from minitp.parallel import ParallelMLP, SyncPointMLP, f, f_bar, gather_serial_grads
from minitp.report import banner, each_rank, indent, ranks, say, verdict
from minitp.testing import max_error

# ---------------------------------------------------------------------------------------------------
# 0. Every rank joins one tensor-parallel group.
#
# comm.init(tp=t) lays the ranks out as a (data-parallel × tensor-parallel) grid; with tp = all of them
# there is one model replica, cut into t shards. (An exception on any rank ends the whole job with its
# traceback, instead of leaving the others waiting in a collective forever; checked=True makes every
# collective first verify that the ranks pass arrays of the same shape and dtype.)
# ---------------------------------------------------------------------------------------------------
mesh = comm.init(tp=MPI.COMM_WORLD.Get_size(), checked=True)
tp_size, rank = mesh.tp.size, mesh.tp.rank


def block(symbol, parameter):
    """Which block of the serial weight ``symbol`` this rank's ``parameter`` holds, e.g. "A[:, 12:24]".

    Every sharded parameter records the axis of the serial weight it was cut along (``split_axis``;
    None when every rank holds the whole of it): rank r holds block r of t equal blocks along it."""
    if parameter.split_axis is None:
        return f"{symbol} {parameter.shape} all"
    width = parameter.shape[parameter.split_axis]
    index = [":"] * parameter.ndim
    index[parameter.split_axis] = f"{rank * width}:{(rank + 1) * width}"
    return f"{symbol}[{', '.join(index)}] {parameter.shape}"


# The sizes: small enough to read, divisible by 1, 2, 3 and 4 ranks. float64 so that the sharded and the
# serial results can be compared to rounding error (~1e-16) rather than to float32's ~1e-7.
seq, batch, hidden, ffn_hidden = 4, 2, 12, 48
dtype = numpy.float64
try:
    comm.divide(hidden, tp_size, "hidden")
    comm.divide(ffn_hidden, tp_size, "ffn_hidden")
except ValueError as error:  # every rank computes the same numbers, so every rank stops here, together
    say(f"{error}.\nThis tutorial runs on 1, 2, 3, 4, 6 or 12 ranks: mpirun -n 4 python tutorials/mlp.py")
    raise SystemExit(1)

banner(f"the MLP block split over {ranks(tp_size)}")
say(f"sizes: seq s={seq}, batch b={batch}, hidden h={hidden}, ffn={ffn_hidden}, {numpy.dtype(dtype).name}")
say("MLP:   Z = Dropout(GeLU(X A + b1) B + b2), X (s, b, h), A = fc1.weight (h, ffn), B = fc2.weight (ffn, h)")

# ---------------------------------------------------------------------------------------------------
# The serial MLP: the reference that both sharded versions must reproduce.
#
# Every rank builds it from the same seed (each weight a pure function of the seed, its name and its
# index: minitp.nn.init), and draws the same input X and the same gradient dL/dZ
# arriving from the layers above (a seeded generator gives every rank the same numbers; a real model
# would have received X from the previous layer, replicated). That the gradient of a replicated output
# is the same on every rank is the invariant that Megatron's backward passes rely on.
# The dropout at the end (p = 0.1) draws the same mask in every copy of the model: its mask is a pure
# function of (seed, call counter, element index), not of a random stream that ranks would consume
# differently.
# ---------------------------------------------------------------------------------------------------
serial = MLP(hidden, ffn_hidden, dropout=0.1, seed=0, dtype=dtype)
rng = numpy.random.default_rng(0)
x_values = backend.from_host(rng.standard_normal((seq, batch, hidden)))
grad_z = backend.from_host(rng.standard_normal((seq, batch, hidden)))

x_serial = Tensor(x_values, requires_grad=True)
z_serial = serial(x_serial)
z_serial.backward(grad_z)

# ---------------------------------------------------------------------------------------------------
# Part 1. A split by rows: the sync point.
#
# The notebook's first idea cuts X by columns and A by rows. Rank r holds rows [r·h/t, (r+1)·h/t) of A and
# the matching columns X_r of X (X is replicated, so taking columns costs nothing), and
#       X A = X_1 A_1 + X_2 A_2 + ... + X_t A_t        (the notebook's x + y with 2 "GPUs")
# Each rank's X_r A_r has the full (s, b, ffn) shape but is only a partial sum.
#
# The sharded module is built from the same seed, with the group it communicates over passed in: rank r
# draws only its own rows of A and B -- the values the serial MLP drew there, since every value is a
# function of where it sits -- so no rank ever holds the whole of A, and there is nothing to load.
# ---------------------------------------------------------------------------------------------------
say("\nPart 1. A split by rows (the contraction dimension): each rank computes a partial sum of X A")
sync_mlp = SyncPointMLP(hidden, ffn_hidden, dropout=0.1, seed=0, dtype=dtype, group=mesh.tp)
x_columns = comm.split(x_values, mesh.tp, axis=-1)
each_rank(f"X[:, :, {rank * x_columns.shape[-1]}:{(rank + 1) * x_columns.shape[-1]}] {x_columns.shape} "
          f"@ {block('A', sync_mlp.fc1.weight)} = X_r A_r {(seq, batch, ffn_hidden)}, a partial sum")

# Why the partial sums must be added BEFORE the GeLU: GeLU is not linear, so the GeLU of a sum is not the
# sum of the GeLUs. Two partial sums, 1 and -1, make the point; this run's own partial sums make it again.
partials = Tensor(backend.xp.asarray([1.0, -1.0]))
gelu_of_sum = F.gelu(partials.sum()).item()
sum_of_gelus = F.gelu(partials).sum().item()
say(f"   GeLU(1 + (-1)) = {gelu_of_sum:.4f}  but  GeLU(1) + GeLU(-1) = {sum_of_gelus:.4f}: "
    f"add the partial sums first, then GeLU")
partial = x_columns @ sync_mlp.fc1.weight.data  # this rank's X_r A_r (the bias is added once, after the sum)
sum_of_gelus = comm.all_reduce(F.gelu(Tensor(partial)).data, mesh.tp)
gelu_of_sum = F.gelu(Tensor(comm.all_reduce(partial, mesh.tp))).data
gelu_gap = float(abs(sum_of_gelus - gelu_of_sum).max())
say(f"   on this run's partial sums: max |Σ GeLU(X_r A_r) - GeLU(Σ X_r A_r)| = {gelu_gap:.2f}"
    + (" (one rank: one partial sum)" if tp_size == 1 else ""))

# So SyncPointMLP all-reduces X_r A_r (s×b×ffn = 4·s×b×h numbers) before the GeLU. After it GeLU's
# output Y is replicated; B is split by rows too, each rank multiplies its columns Y_r by its rows B_r,
# and a second all-reduce (s×b×h) adds those partial sums. In backward, the two places where a
# replicated tensor was cut into column blocks (X -> X_r, Y -> Y_r) become all-gathers of the gradient
# blocks: the backward of "keep my block" is "collect everyone's block".
# The log records every collective this rank takes part in (all ranks take part in the same ones):
# "payload" is the full buffer S, "ring B/rank" what a ring algorithm makes each rank send for it,
# 2(n-1)/n·S for an all-reduce and (n-1)/n·S for an all-gather.
x_sync = Tensor(x_values, requires_grad=True)
with comm.log_collectives() as sync_forward:
    z_sync = sync_mlp(x_sync)
with comm.log_collectives() as sync_backward:
    z_sync.backward(grad_z)
say("   forward, SyncPointMLP:")
say(indent(sync_forward.table()))
say("   backward:")
say(indent(sync_backward.table()))
say(f"   {sync_forward.count('all_reduce')} all-reduces forward: X A before the GeLU (s·b·ffn = 4sbh), "
    f"then Y B (sbh)")
say(f"   {sync_backward.count('all_gather')} all-gathers backward: dY (4sbh), dX (sbh); ring bytes per rank "
    f"{sync_forward.total_ring_bytes():,.0f} + {sync_backward.total_ring_bytes():,.0f} = "
    f"{sync_forward.total_ring_bytes() + sync_backward.total_ring_bytes():,.0f} B")

# ---------------------------------------------------------------------------------------------------
# Part 2. Megatron: A split by columns, B by rows.
#
# The notebook's second idea: rank r holds columns A_r of A, so X A_r is a block of whole COLUMNS of X A --
# no sum needed, and GeLU, which acts on each element alone, can run on it at once:
#       Y = GeLU(X A) = [GeLU(X A_1) | ... | GeLU(X A_t)]
# Rank r's Y_r is exactly the input that rows B_r of B multiply, so the second GEMM needs nothing from
# the other ranks either: Y B = Y_1 B_1 + ... + Y_t B_t, and one all-reduce adds these partial sums.
# The bias b2 is replicated and added once, after that sum (added by every rank it would count t times).
#
# The two collectives are Megatron's conjugate pair, autograd Functions in minitp.parallel.tensor.mappings:
#   f  (before A): identity forward -- X is already on every rank -- and all-reduce backward: each
#      rank's A_r contributes its own part of dL/dX, and the true gradient is their sum.
#   f̄  (after B; Megatron's "g"): all-reduce forward, identity backward: Z = Σ Z_r, so dL/dZ_r = dL/dZ.
# ---------------------------------------------------------------------------------------------------
say("\nPart 2. Megatron: A split by columns, B by rows; GeLU on each rank's own columns")
megatron_mlp = ParallelMLP(hidden, ffn_hidden, dropout=0.1, seed=0, dtype=dtype, group=mesh.tp)
fc1, fc2, dropout = megatron_mlp.fc1, megatron_mlp.fc2, megatron_mlp.dropout
each_rank(f"{block('A', fc1.weight)} {block('b1', fc1.bias)}  {block('B', fc2.weight)}  {block('b2', fc2.bias)}")

# Megatron's MLP written out with the library's operators, on rank r, before using the module:
#       Z = Dropout( f̄( GeLU( f(X) A_r + b1_r ) B_r ) + b2 )
# f and f̄ are the autograd Functions above; everything between them is this rank's own arithmetic.
# The dropout draws the mask of its first call (counter 0), the one the module will draw too.
x_by_hand = Tensor(x_values, requires_grad=True)
y_r = F.gelu(F.matmul(f(x_by_hand, mesh.tp), fc1.weight) + fc1.bias)  # (s, b, ffn/t): this rank's columns of Y
z_partial = F.matmul(y_r, fc2.weight)  # (s, b, ffn/t) @ (ffn/t, h): rank r's partial sum Y_r B_r
z_by_hand = F.dropout(f_bar(z_partial, mesh.tp) + fc2.bias, dropout.p, dropout.seed, counter=0)
z_by_hand.backward(grad_z)
megatron_mlp.zero_grad()  # the hand-written run left gradients in the module's parameters: start afresh
each_rank(f"by hand: f(X) {x_values.shape} -> Y_r {y_r.shape} -> Y_r B_r {z_partial.shape} -> f̄ -> Z {z_by_hand.shape}")

x_megatron = Tensor(x_values, requires_grad=True)
with comm.log_collectives() as megatron_forward:
    z_megatron = megatron_mlp(x_megatron)
with comm.log_collectives() as megatron_backward:
    z_megatron.backward(grad_z)
by_hand_error = max(max_error(z_by_hand, z_megatron), max_error(x_by_hand.grad, x_megatron.grad))
say(f"   the module computes what the lines above do: max error {by_hand_error:.1e} (Z and dX)")
say("   forward, ParallelMLP (f̄ after B):")
say(indent(megatron_forward.table()))
say("   backward (f before A):")
say(indent(megatron_backward.table()))

# What one all-reduce of Z costs: S = s·b·h numbers of 8 bytes. A ring all-reduce is a reduce-scatter
# (each rank passes n-1 blocks of S/n around the ring) then an all-gather (n-1 blocks more): 2(n-1)/n·S
# bytes sent by each rank, whatever the number of ranks -- a little under 2S.
payload = seq * batch * hidden * numpy.dtype(dtype).itemsize
ring_formula = 2 * (tp_size - 1) / tp_size * payload
megatron_ring = megatron_forward.total_ring_bytes() + megatron_backward.total_ring_bytes()
sync_ring = sync_forward.total_ring_bytes() + sync_backward.total_ring_bytes()
say(f"   one all-reduce each way, of S = s·b·h·8 = {payload:,} B: the ring formula 2(n-1)/n·S gives "
    f"{ring_formula:,.0f} B per rank,")
say(f"   the log {megatron_forward.total_ring_bytes():,.0f} B forward and "
    f"{megatron_backward.total_ring_bytes():,.0f} B backward")
if megatron_ring:
    say(f"   forward + backward, per rank: Megatron sends {megatron_ring:,.0f} B, the sync-point split "
        f"{sync_ring:,.0f} B ({sync_ring / megatron_ring:.2f}x):")
    say("   it communicates X A, 4x wider than Z, and communicates twice in each direction")
else:
    say("   with one rank the ring sends nothing: every collective is a no-op, and both splits cost 0 B")

# ---------------------------------------------------------------------------------------------------
# The proof: both sharded MLPs compute exactly the serial MLP.
#
# Compare the output, dL/dX, and the gradient of every parameter with the serial ones. A rank holds the
# gradient of its shard only; gather_serial_grads all-gathers the shards back into full (serial-shaped)
# gradients along each parameter's split axis. The error is max |sharded - serial| (relative above 1);
# in float64 it should be rounding error, ~1e-16. Every rank checks its own copy; an all-reduce of the
# worst error makes every rank reach the same verdict, so they stop together if it fails.
# ---------------------------------------------------------------------------------------------------
say("\nThe proof: sharded vs serial, max |error| of the output and of every gradient")
symbols = {"fc1.weight": "A", "fc1.bias": "b1", "fc2.weight": "B", "fc2.bias": "b2"}  # serial name -> paper
serial_parameters = dict(serial.named_parameters())
say(f"   {'':18}" + "".join(f"{label:>9}" for label in ["Z", "dX"] + [f"d{symbols[name]}" for name in symbols]))
worst = 0.0
for label, sharded, x_sharded, z_sharded in (("sync-point (1)", sync_mlp, x_sync, z_sync),
                                               ("Megatron (2)", megatron_mlp, x_megatron, z_megatron)):
    grads = gather_serial_grads(sharded, mesh.tp)
    errors = [max_error(z_sharded, z_serial), max_error(x_sharded.grad, x_serial.grad)]
    errors += [max_error(grads[name], serial_parameters[name].grad) for name in symbols]
    worst = max(worst, *errors)
    say(f"   {label:18}" + "".join(f"{e:9.1e}" for e in errors))
worst = mesh.world.comm.allreduce(max(worst, by_hand_error), op=MPI.MAX)
megatron_is_one_each_way = (megatron_forward.count() == megatron_forward.count("all_reduce") == 1
                            and megatron_backward.count() == megatron_backward.count("all_reduce") == 1)

# ---------------------------------------------------------------------------------------------------
# Where next: the other half of a transformer layer. tutorials/attention.py splits self-attention the
# same way -- heads are independent, so each rank takes whole heads (the qkv projection by columns, the
# output projection by rows) -- with again one all-reduce forward and one backward, and corrects the
# mistakes in the notebook's attention sketch. Together the two give the paper's count: 2
# all-reduces forward and 2 backward per layer, each of s×b×h.
# ---------------------------------------------------------------------------------------------------
say("\nnext: mpirun -n 4 python tutorials/attention.py (whole heads per rank, the same one all-reduce each way)")
verdict(worst <= 1e-12 and megatron_is_one_each_way,
        f"sharded MLP == serial MLP (max error {worst:.1e}, output and all gradients, both splits, "
        f"and the hand-written one) on {ranks(tp_size)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12); Megatron collectives forward "
                f"{megatron_forward.count()}, backward {megatron_backward.count()} (must be 1 all-reduce each)")
