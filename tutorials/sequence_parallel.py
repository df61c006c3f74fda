"""Sequence parallelism: LayerNorm and dropout split along the sequence -- why it is exact, why it is worth
doing, and why it costs no extra communication.

    mpirun -n 4 python tutorials/sequence_parallel.py        (1, 2 or 3 ranks work too)

Read tutorials/mlp.py and tutorials/attention.py first. Tensor parallelism (Shoeybi et al. 2019) splits
the two GEMM-heavy parts of a transformer layer -- attention by heads, the MLP by columns then rows --
and leaves everything between them replicated: the two LayerNorms, the dropouts after attention and
after the MLP, the residual additions. There every rank holds the whole (s, b, h) tensor and does the
same work on it. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", section 4.2.2) split those parts along the sequence instead: rank r of t keeps tokens
[r·s/t, (r+1)·s/t).

A learner's notebook on tensor parallelism (its part "Sequence Parallelism") makes two remarks:
LayerNorm does not mix tokens, and dropout is elementwise. This file makes each precise, then answers
the two questions the seed leaves open:

    1. LayerNorm normalises each token alone, so a block of tokens gives that block of the output;
       and why the block is a block of the SEQUENCE, contiguous in the (s, b, h) layout
    2. dropout on a block of tokens must draw exactly that block of the serial mask
    3. why split them at all: the bytes each rank keeps for backward, measured, beside the paper's formulas
    4. why it costs no extra communication: the collective logs of a TP block and a TP+SP block
    5. the one sum that must not be forgotten: the replicated LayerNorm weight's gradient
and ends with the check: sequence-parallel LayerNorm and dropout, forward and backward, equal the serial ones.

Every rank runs this file; rank 0 prints (say), and per-rank lines are gathered to rank 0 so they come out
in order (each_rank; both from minitp.report).
"""
import numpy
from mpi4py import MPI

from minitp import Tensor, backend, comm, nn, no_grad, track_saved
from minitp.parallel import ParallelTransformerBlock, SequenceParallelDropout, SequenceParallelLayerNorm
from minitp.report import banner, each_rank, indent, ranks, say, verdict
from minitp.testing import max_error

mesh = comm.init(tp=MPI.COMM_WORLD.Get_size(), checked=True)  # all ranks in one tensor-parallel group: one model, t shards
tp_size, rank = mesh.tp.size, mesh.tp.rank


def span(first, count, noun):
    """"tokens 3-5" for ``count`` items from ``first``; "token 3" for one."""
    return f"{noun} {first}" if count == 1 else f"{noun}s {first}-{first + count - 1}"


# The sizes of tutorials/attention.py: 12 heads of 2 features, and 12 tokens, divide among 1, 2, 3 or 4
# ranks. float64, so that sharded and serial results can be compared to rounding error.
seq, batch, heads, head_dim = 12, 2, 12, 2
hidden, ffn_hidden, p = heads * head_dim, 4 * heads * head_dim, 0.1
dtype = numpy.float64
try:
    tokens_per_rank = comm.divide(seq, tp_size, "seq (tokens split over the ranks)")
    comm.divide(heads, tp_size, "heads")
except ValueError as error:  # every rank computes the same numbers, so every rank stops here, together
    say(f"{error}.\nThis tutorial runs on 1, 2, 3, 4, 6 or 12 ranks: mpirun -n 4 python tutorials/sequence_parallel.py")
    raise SystemExit(1)
first_token = rank * tokens_per_rank
my_tokens = span(first_token, tokens_per_rank, "token")

banner(f"sequence parallelism over {ranks(tp_size)}")
say(f"sizes: seq s={seq}, batch b={batch}, hidden h={hidden}, heads a={heads}, ffn={ffn_hidden}, "
    f"dropout p={p}, {numpy.dtype(dtype).name}; activations (s, b, h)")

rng = numpy.random.default_rng(0)
x_values = backend.from_host(rng.standard_normal((seq, batch, hidden)))  # the same on every rank (same seed)

# ---------------------------------------------------------------------------------------------------
# 1. LayerNorm normalises each token alone.
#
# LayerNorm(x)[i, j] = (x[i, j] - mean_j) / std_j * weight + bias, where mean_j and std_j are taken over
# the h features of token (i, j) only. The notebook shows it with rows that are constant: they normalise to
# exactly 0, which can only happen if each row's mean is its own. Sharper: change one token and see which
# outputs move. Only that token's row does -- the Jacobian is block-diagonal, one h×h block per token --
# so normalising a block of tokens on its own gives exactly that block of the full result. Each rank
# runs SequenceParallelLayerNorm on its s/t tokens, with NO communication, and matches its rows of the
# serial output.
# ---------------------------------------------------------------------------------------------------
say("\n1. LayerNorm normalises each token alone, so the sequence can be split")
layer_norm = nn.LayerNorm(hidden, dtype=dtype)
layer_norm.load_state_dict({"weight": rng.standard_normal(hidden), "bias": rng.standard_normal(hidden)})
nudged = x_values.copy()
nudged[7, 1, 0] += 1.0  # token 7 of sequence 1 (batch entry 1), one feature
with no_grad():
    normalised = layer_norm(Tensor(x_values)).data
    moved = backend.to_host(abs(layer_norm(Tensor(nudged)).data - normalised).max(axis=-1) > 0)  # (s, b)
say(f"   change one feature of token 7, batch entry 1: the output rows that move are (token, batch entry) "
    f"{[tuple(map(int, where)) for where in numpy.argwhere(moved)]}, 1 of {seq * batch}")

sp_layer_norm = SequenceParallelLayerNorm(hidden, dtype=dtype, group=mesh.tp)
sp_layer_norm.load_state_dict(layer_norm.state_dict())  # the same random weights: replicated, every rank holds them whole
with no_grad():
    my_normalised = sp_layer_norm(Tensor(comm.split(x_values, mesh.tp, axis=0))).data
ln_error = max_error(my_normalised, comm.split(normalised, mesh.tp, axis=0))
each_rank(f"{my_tokens} {my_normalised.shape}: LayerNorm of my tokens alone vs those rows of the serial "
          f"output: max error {ln_error:.1e}")

# Which tokens? The notebook stores (b, s, h), flattens it to (b·s, h) rows and cuts the rows in halves:
# row = batch·s + token, so the first half is batch entry 0 -- a split of the batch (that is data
# parallelism), or, with more ranks than entries, pieces of single sequences. The papers store (s, b, h):
# row = token·b + batch, so cutting rows (or cutting s) gives rank r tokens [r·s/t, (r+1)·s/t) of EVERY
# sequence -- one contiguous block of (s/t)·b·h numbers. The paper splits s because:
#   - the block is contiguous: the all-gather (g) before attention and the MLP, and the reduce-scatter
#     (ḡ) after them, move it as it lies -- MPI's rank-major concatenation of the blocks IS the (s, b, h)
#     tensor, no copy either way (minitp.comm gathers axis 0 without one);
#   - s is long (2048 in the paper's models) and divides by the usual t; the micro-batch b that one
#     tensor-parallel group works on is often as small as 1 -- nothing to split -- and splitting the
#     batch is data parallelism's job anyway.
# (The notebook's `layernorm1 = layernorm(embedding1)` also, perhaps by accident, uses ONE LayerNorm for
# both halves: right, the weight must be the same on every rank -- and section 5 shows what that implies.)
notebook_rows = batch * seq // tp_size  # the notebook's cut: rows [r·b·s/t, (r+1)·b·s/t) of (b·s, h), row = entry·s+token
notebook_pieces = [(row // seq, row % seq) for row in range(rank * notebook_rows, (rank + 1) * notebook_rows)]
notebook_text = ", ".join(
    f"entry {entry} " + span(min(token for e, token in notebook_pieces if e == entry),
                             sum(1 for e, _ in notebook_pieces if e == entry), "token")
    for entry in sorted({e for e, _ in notebook_pieces}))
if tp_size > 1 and notebook_rows % seq == 0:
    notebook_text += ": whole sequences, a batch split"
each_rank(f"split s of (s, b, h): {my_tokens} of every entry, one block  |  notebook's (b·s, h) rows: {notebook_text}")

# ---------------------------------------------------------------------------------------------------
# 2. Dropout is elementwise -- but its mask must be the serial mask's slice.
#
# The notebook: "dropout is a per element operation", so it can run on any block of the tensor. True, and
# not enough: the sharded model is the serial model only if every element is dropped in both or in
# neither. A stateful generator (numpy.random, torch.manual_seed) hands out numbers in the order they
# are asked for: a rank seeded like the serial run draws the serial run's FIRST s/t rows of numbers, not
# its own rows. minitp's mask is a pure function of (seed, call counter, the element's GLOBAL index),
# so SequenceParallelDropout only has to say where its block sits: rows [r·s/t, (r+1)·s/t) of (s, b, h).
# Dropout of a tensor of ones shows the mask itself (kept elements become 1/(1-p), dropped ones 0).
# ---------------------------------------------------------------------------------------------------
say(f"\n2. Dropout (p={p}) on a block of tokens draws exactly that block of the serial mask")
dropout_seed = 7
ones = backend.xp.ones((seq, batch, hidden), dtype=dtype)
with no_grad():
    serial_keep = nn.Dropout(p, seed=dropout_seed)(Tensor(ones)).data != 0
    my_keep = SequenceParallelDropout(p, seed=dropout_seed, group=mesh.tp)(Tensor(comm.split(ones, mesh.tp, axis=0))).data != 0
masks_agree = bool((my_keep == comm.split(serial_keep, mesh.tp, axis=0)).all())
stateful_serial = numpy.random.default_rng(dropout_seed).random((seq, batch, hidden)) >= p
stateful_mine = numpy.random.default_rng(dropout_seed).random(tuple(my_keep.shape)) >= p
stateful_wrong = int((stateful_mine != comm.split(stateful_serial, mesh.tp, axis=0)).sum())
say(f"   the serial mask keeps {int(serial_keep.sum())} of {serial_keep.size} elements")
each_rank(f"{my_tokens}: keeps {int(my_keep.sum())} of {my_keep.size}; == those rows of the serial mask: "
          f"{masks_agree}  |  a stateful numpy generator: {stateful_wrong} of {my_keep.size} wrong")

# ---------------------------------------------------------------------------------------------------
# 3. Why split them: the activations kept for backward.
#
# Splitting LayerNorm and dropout saves no compute worth mentioning. It saves memory: what a layer
# keeps for backward. Korthikanti et al. (section 4) count it per layer, with 2-byte activations and
# 1-byte dropout masks: attention 11sbh + 5as²b, MLP 19sbh, the two LayerNorm inputs 4sbh (minitp's
# LayerNorm keeps x_hat instead of x: the same size), in all sbh(34 + 5as/h). Written with e bytes per
# activation and m per mask element, for the serial layer ("none": no parallelism):
#       none  = e(16sbh + 2as²b) + m(2sbh + as²b)
# Tensor parallelism divides what lives inside attention and the MLP by t, but NOT the replicated part:
# the LayerNorm inputs (2sbh), the inputs of qkv and fc1 (2sbh: each rank multiplies ALL of X by its
# columns) and the two dropout masks after proj and fc2 (2sbh masks):
#       TP    = e(4sbh + (12sbh + 2as²b)/t) + m(2sbh + as²b/t)          paper: sbh(10 + 24/t + 5as/(ht))
# Sequence parallelism splits that replicated part along s, and keeps the inputs of qkv and fc1 as the
# rank's s/t tokens (gathering them again in backward, section 4):
#       TP+SP = none / t                                                  paper: sbh(34/t + 5as/(ht))
# We measure one block of each kind with minitp.track_saved(), which counts every array an op keeps
# for backward (weights excluded), here with e = 8 (float64) and m = 1 (bool masks), dropout on.
# ---------------------------------------------------------------------------------------------------
say("\n3. Why split them: bytes kept for backward by one transformer block, per rank (dropout on)")
serial_block = nn.TransformerBlock(hidden, heads, ffn_hidden, dropout=p, attention_dropout=p, seed=0, dtype=dtype)
blocks = {"serial": serial_block}
for name, sequence_parallel in (("TP", False), ("TP+SP", True)):
    blocks[name] = ParallelTransformerBlock(hidden, heads, ffn_hidden, dropout=p, attention_dropout=p, seed=0,
                                            dtype=dtype, sequence_parallel=sequence_parallel, group=mesh.tp)
grad_y = backend.from_host(rng.standard_normal((seq, batch, hidden)))  # dL/dy from the layers above

saved, forward_logs, backward_logs = {}, {}, {}
for name, block in blocks.items():
    sharded = name == "TP+SP"  # its input and output are this rank's tokens; the others', all of them
    x = Tensor(comm.split(x_values, mesh.tp, axis=0) if sharded else x_values, requires_grad=True)
    with track_saved() as saved[name], comm.log_collectives() as forward_logs[name]:
        y = block(x)
    with comm.log_collectives() as backward_logs[name]:
        y.backward(comm.split(grad_y, mesh.tp, axis=0) if sharded else grad_y)

e, m = numpy.dtype(dtype).itemsize, 1
sbh, as2b = seq * batch * hidden, heads * seq * seq * batch
paper = {"serial": e * (16 * sbh + 2 * as2b) + m * (2 * sbh + as2b)}
paper["TP"] = e * (4 * sbh + (12 * sbh + 2 * as2b) // tp_size) + m * (2 * sbh + as2b // tp_size)
paper["TP+SP"] = paper["serial"] // tp_size
# What the paper does not count, named: each LayerNorm also keeps 1/std of every token it normalised
# (one number per token, b·s of them, or b·s/t under SP; the paper counts only the LayerNorm's input),
# and attention keeps the scale 1/√d that multiplies q (one float64, on every rank).
ln_stats = {name: 2 * batch * (tokens_per_rank if name == "TP+SP" else seq) * e for name in blocks}
scale = e
say(f"   e = {e} B per activation, m = {m} B per mask element, s·b·h = {sbh:,}, a·s²·b = {as2b:,}, t = {tp_size}")
say(f"   {'':7}{'measured':>10}{'paper':>10}   {'the paper, rescaled':41}measured - paper")
formulas = {"serial": "e(16sbh+2as²b) + m(2sbh+as²b)",
            "TP": "e(4sbh+(12sbh+2as²b)/t) + m(2sbh+as²b/t)", "TP+SP": "(the serial figure) / t"}
accounted = True
for name in blocks:
    extra = saved[name].total - paper[name]
    accounted &= extra == ln_stats[name] + scale
    say(f"   {name:7}{saved[name].total:10,}{paper[name]:10,}   {formulas[name]:41}{extra:5,} = "
        f"LN 1/std {ln_stats[name]:,} + 1/√d {scale}")
# Where the bytes are, by the op that keeps them. Under TP the LayerNorm row and the Dropout masks of the
# residual path stay at their serial size; so do the MatMul inputs of qkv and fc1 (inside "MatMul"). Under
# TP+SP those two inputs are kept by LinearWithSequenceGather, the column-parallel GEMM that gathers its
# input itself -- as its rank's s/t tokens.
ops = list(dict.fromkeys(op for name in blocks for op in saved[name].by_op))
say(f"   by op:{'':26}" + "".join(f"{op:>11}" for op in ("serial", "TP", "TP+SP")))
for op in ops:
    say(f"     {op:28}" + "".join(f"{saved[name].by_op.get(op, 0):11,}" for name in blocks))
say("     (LayerNorm: x_hat and 1/std; MatMul: GEMM operands -- inputs, q, k, v, the dropped-out probabilities;")
say("      LinearWithSequenceGather: qkv's and fc1's inputs as s/t tokens; Softmax: its output; Dropout: bool")
say("      masks; GeLU: its input; Mul: q's scale 1/√d)")
say(f"   TP keeps {saved['TP'].total / saved['serial'].total:.2f} of the serial bytes, TP+SP "
    f"{saved['TP+SP'].total / saved['serial'].total:.2f} (1/t = {1 / tp_size:.2f}): with SP nothing is replicated "
    f"but one scalar")

# ---------------------------------------------------------------------------------------------------
# 4. Why it costs no extra communication.
#
# TP's block communicates with f̄ (all-reduce forward) after proj and fc2, and with f (all-reduce
# backward) before qkv and fc1: 2 all-reduces of an s×b×h tensor each way. A ring all-reduce IS a
# reduce-scatter followed by an all-gather, 2(n-1)/n·S bytes per rank. TP+SP splits it at the seam:
# ḡ reduce-scatters after proj and fc2 (the sum arrives already split by tokens, ready for dropout and
# LayerNorm), and g all-gathers before qkv and fc1 (which need every token). Forward: same bytes. In
# backward g and ḡ swap (the backward of an all-gather is a reduce-scatter, and vice versa): same bytes
# again, plus two things TP does not need:
#   - the re-gather of X for dA: qkv and fc1 kept their input as s/t tokens (section 3), but
#     dA_r = Xᵀ dY_r needs all s of them, so backward all-gathers X again -- the price of storing it
#     sharded. (Megatron-LM pays it too, and overlaps it with the dX GEMM.)
#   - small all-reduces of h numbers: ln1's and ln2's weight and bias, and the biases of proj and fc2,
#     are replicated but meet only the rank's tokens. Section 5 explains why they must be summed.
# ---------------------------------------------------------------------------------------------------
say("\n4. Why it costs no extra communication: the collective logs")
for phase, logs in (("forward", forward_logs), ("backward", backward_logs)):
    for name in ("TP", "TP+SP"):
        say(f"   {phase}, {name}:")
        say(indent(logs[name].table()))
tp_forward, sp_forward = forward_logs["TP"].total_ring_bytes(), forward_logs["TP+SP"].total_ring_bytes()
tp_backward = backward_logs["TP"].total_ring_bytes()
regather = backward_logs["TP+SP"].total_ring_bytes("all_gather", "re-gather")
replicated_sums = backward_logs["TP+SP"].total_ring_bytes("all_reduce")
sp_pairs = backward_logs["TP+SP"].total_ring_bytes() - regather - replicated_sums
say(f"   ring bytes sent per rank             {'TP':>8}{'TP+SP':>8}")
say(f"   forward                              {tp_forward:8,.0f}{sp_forward:8,.0f}   2 all-reduces -> "
    f"2 all-gathers (g) + 2 reduce-scatters (ḡ)")
say(f"   backward, the same pairs             {tp_backward:8,.0f}{sp_pairs:8,.0f}   g <-> ḡ swapped")
say(f"   backward, re-gather X for dA         {0:8,}{regather:8,.0f}   "
    f"{backward_logs['TP+SP'].count('all_gather', 're-gather')} all-gathers: qkv's and fc1's inputs")
say(f"   backward, replicated weights' grads  {0:8,}{replicated_sums:8,.0f}   "
    f"{backward_logs['TP+SP'].count('all_reduce')} all-reduces of h numbers")
if tp_size == 1:
    say("   (one rank: the ring sends nothing, every collective is a no-op; run with 2 or 4 ranks)")
communication_as_claimed = tp_forward == sp_forward and tp_backward == sp_pairs

# ---------------------------------------------------------------------------------------------------
# 5. The sum that must not be forgotten: the LayerNorm weight's gradient.
#
# LayerNorm's weight (and bias) is the same on every rank, and used on every rank's tokens. Its
# gradient is a sum over ALL tokens: dweight = Σ_tokens dy ⊙ x_hat. A rank sees s/t of them, so its
# local gradient is a partial sum. Under TP alone every rank sees all tokens and the local gradient is
# already the full one; under SP it is not. The backward of a copy is a sum, so the partial gradients
# must be all-reduced (Megatron-LM does it after the backward pass, for every sequence-parallel weight).
# Forgotten, it is the classic sequence-parallel bug: each rank steps with its own partial sum, and the
# replicas of the weight drift apart. Below, a plain nn.LayerNorm applied to the rank's tokens (the bug),
# then the sum; SequenceParallelLayerNorm does that sum itself: its weight and bias enter through f
# (identity forward, all-reduce backward), so autograd sums their gradients like any other copy's.
# ---------------------------------------------------------------------------------------------------
say("\n5. The replicated LayerNorm weight: its gradient is a sum over every rank's tokens")
grad_normalised = backend.from_host(rng.standard_normal((seq, batch, hidden)))
serial_ln_x = Tensor(x_values, requires_grad=True)
layer_norm(serial_ln_x).backward(grad_normalised)
forgot_the_sum = nn.LayerNorm(hidden, dtype=dtype)  # the serial layer, run on this rank's tokens only
forgot_the_sum.load_state_dict(layer_norm.state_dict())
forgot_the_sum(Tensor(comm.split(x_values, mesh.tp, axis=0))).backward(comm.split(grad_normalised, mesh.tp, axis=0))
partial_error = max_error(forgot_the_sum.weight.grad, layer_norm.weight.grad)
summed_error = max_error(comm.all_reduce(forgot_the_sum.weight.grad, mesh.tp), layer_norm.weight.grad)
each_rank(f"dweight from {my_tokens} alone: error {partial_error:.1e}; all-reduced over the ranks: "
          f"error {summed_error:.1e}")

# ---------------------------------------------------------------------------------------------------
# The check: sequence-parallel LayerNorm then dropout, forward and backward, equal the serial layers.
#
# Each rank feeds its tokens through SequenceParallelLayerNorm and SequenceParallelDropout (fresh, so
# their call counters start where the serial dropout's does), with its tokens' slice of the gradient
# from above. Its output and input gradient must be its rows of the serial ones; the weight and bias
# gradients, all-reduced inside the layer, must be the serial ones, whole. Every rank also checks the
# claims of sections 1-4, and an all-reduce gives every rank the same verdict, so they stop together.
# ---------------------------------------------------------------------------------------------------
say("\nThe check: SequenceParallelLayerNorm -> SequenceParallelDropout vs LayerNorm -> Dropout, max |error|")
layer_norm.zero_grad()
serial_x = Tensor(x_values, requires_grad=True)
serial_out = nn.Dropout(p, seed=dropout_seed)(layer_norm(serial_x))
serial_out.backward(grad_normalised)

sp_layer_norm.zero_grad()
my_x = Tensor(comm.split(x_values, mesh.tp, axis=0), requires_grad=True)
my_out = SequenceParallelDropout(p, seed=dropout_seed, group=mesh.tp)(sp_layer_norm(my_x))
my_out.backward(comm.split(grad_normalised, mesh.tp, axis=0))
errors = {"output": max_error(my_out, comm.split(serial_out.data, mesh.tp, axis=0)),
          "dx": max_error(my_x.grad, comm.split(serial_x.grad, mesh.tp, axis=0)),
          "dweight": max_error(sp_layer_norm.weight.grad, layer_norm.weight.grad),
          "dbias": max_error(sp_layer_norm.bias.grad, layer_norm.bias.grad)}
each_rank(", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
worst = mesh.world.comm.allreduce(max(max(errors.values()), ln_error, summed_error), op=MPI.MAX)
claims = {"dropout masks are the serial mask's rows": masks_agree,
          "saved bytes = paper + LN 1/std + 1/√d": accounted,
          "TP+SP ring bytes = TP's + re-gathers + replicated grads": communication_as_claimed}
failed = [claim for claim, holds in claims.items() if not mesh.world.comm.allreduce(holds, op=MPI.LAND)]

say("\nnext: mpirun -n 4 python tutorials/transformer.py (one whole TP+SP block, rank by rank)")
verdict(worst <= 1e-12 and not failed,
        f"sequence-parallel LayerNorm and dropout == serial (max error {worst:.1e}, output and all gradients; "
        f"masks, bytes and ring bytes as claimed) on {ranks(tp_size)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12); claims that do not hold: {failed}")
