"""Self-attention split by heads over MPI ranks, done right, and proven equal to the serial attention.

    mpirun -n 4 python tutorials/attention.py        (1, 2 or 3 ranks work too)

Read tutorials/mlp.py first: this is its other half. Multi-head attention is
    X (s, b, h) --qkv--> q, k, v (b, a, s, d) --softmax(q k^T / sqrt(d)) v--> (s, b, h) --proj--> Z (s, b, h)
with a heads of d = h/a features each. Megatron (Shoeybi et al. 2019, section 3) gives each of t ranks a/t
WHOLE heads: the qkv projection split by columns, the output projection by rows -- the MLP's column-then-row
pattern -- so the only communication is one all-reduce forward and one backward.

A learner's notebook on tensor parallelism (its part "3. MHA") had the right intuition -- heads are
independent -- and a sketch that does not yet work. We start by naming its mistakes, then build the real
thing and check it against the serial MultiHeadAttention, dropout and causal mask included.

Every rank runs this file; rank 0 prints (say), and per-rank lines are gathered to rank 0 so they come out
in order (each_rank; both from minitp.report).
"""
import numpy
from mpi4py import MPI

from minitp import Tensor, backend, comm
from minitp import functional as F
from minitp.nn import MultiHeadAttention, attention_core
from minitp.parallel import ParallelAttention, gather_serial_grads
from minitp.report import banner, each_rank, indent, ranks, say, verdict
from minitp.testing import max_error

mesh = comm.init(tp=MPI.COMM_WORLD.Get_size(), checked=True)  # all ranks in one tensor-parallel group: one model, t shards
tp_size, rank = mesh.tp.size, mesh.tp.rank


def spans(numbers):
    """[0, 1, 2, 5] -> "0-2, 5": a set of indices, written as runs."""
    runs, numbers = [], sorted(numbers)
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


# 12 heads divide among 1, 2, 3 or 4 ranks; 2 features each keeps hidden small. float64 for the proof.
seq, batch, heads = 4, 2, 12
head_dim = 2
hidden = heads * head_dim
attention_dropout, output_dropout = 0.2, 0.1
dtype = numpy.float64
try:
    heads_per_rank = comm.divide(heads, tp_size, "heads")
except ValueError as error:  # every rank computes the same numbers, so every rank stops here, together
    say(f"{error}.\nThis tutorial runs on 1, 2, 3, 4, 6 or 12 ranks: mpirun -n 4 python tutorials/attention.py")
    raise SystemExit(1)

banner(f"self-attention split by heads over {ranks(tp_size)}")
say(f"sizes: seq s={seq}, batch b={batch}, heads a={heads} of d={head_dim}, hidden h={hidden}, "
    f"{numpy.dtype(dtype).name}; causal, attention dropout {attention_dropout}, output dropout {output_dropout}")

# The serial model, the same on every rank (same seed), and the same input X and gradient dL/dZ from above.
serial = MultiHeadAttention(hidden, heads, causal=True, attention_dropout=attention_dropout,
                            dropout=output_dropout, seed=0, dtype=dtype)
rng = numpy.random.default_rng(0)
x_values = backend.from_host(rng.standard_normal((seq, batch, hidden)))
grad_z = backend.from_host(rng.standard_normal((seq, batch, hidden)))

# q, k and v of every head, computed serially, for the demonstrations below: qkv's output columns are
# head-major, head i's [q_i | k_i | v_i] side by side (section 3 says why), so (s, b, 3h) reads as
# (s, b, a, 3, d); then the heads move next to the batch: (b, a, s, d).
qkv = (x_values @ serial.qkv.weight.data + serial.qkv.bias.data).reshape(seq, batch, heads, 3, head_dim)
q, k, v = (qkv[:, :, :, part].transpose(1, 2, 0, 3) for part in range(3))

# ---------------------------------------------------------------------------------------------------
# 1. The notebook's sketch, mistake by mistake.
#
# (1) `ks = q.reshape(...)` and `vs = q.reshape(...)`: keys and values are cut from q. Then every score
#     q_i·k_j is q_i·q_j, so every score matrix is symmetric (token i likes j exactly as j likes i), the
#     output is softmax(q q^T) q, and the k and v columns of the qkv weight are never used (they would
#     never learn). Correct: q, k, v are three different slices of the qkv output.
# (2) `q.reshape(num_gpus, B*heads/num_gpus, S, -1).unbind(0)`: the axis being cut is the flattened
#     (batch, head) axis, batch-major (index = batch·heads + head). Its first block is the first batches
#     with ALL their heads: data parallelism, not head parallelism -- every GPU would need every head's
#     weights. Below, the notebook's own reshape is applied to (batch, head) labels. Correct: keep the heads
#     on their own axis, (b, a, s, d), and give each rank a block of THAT axis. (The same line
#     hard-codes the sequence length 120: `S` was meant.)
# (3) `for i in qs: qs[i].to(f'cuda:{i}')`: iterating a tuple yields its tensors, not indices, and a
#     tuple indexed with a tensor is a TypeError; `.to()` returns a new tensor, which the loop throws
#     away, so nothing would move (`for i, q_i in enumerate(qs): qs_on_gpu.append(q_i.to(...))` was
#     meant). And the attention below still multiplies the whole q and k: the pieces are never used.
#     Correct, with MPI: nothing moves at all. Each rank is its own process and computes its own heads,
#     where its shard of the weights already lives.
# (4) `self.proj(torch.cat[gpu1, gpu2])` subscripts the function instead of calling it:
#     `torch.cat([gpu1, gpu2], dim=-1)`. Better still, no concatenation: each rank feeds its heads into
#     its own rows of proj, and one all-reduce adds the partial results (sections 4 and 6).
# (5) `qkv.reshape(B, S, 3, -1)` assumes qkv's columns are [all q | all k | all v]. Serially that is a
#     matter of convention; for a column split it decides whether a rank gets whole heads (section 3).
# ---------------------------------------------------------------------------------------------------
say("\n1. The notebook's attention sketch, and its corrections")
scores_k_is_q = q @ q.transpose(0, 1, 3, 2)
scores = q @ k.transpose(0, 1, 3, 2)
asymmetry = float(abs(scores - scores.transpose(0, 1, 3, 2)).max())
say(f"   (1) k, v cut from q: every score matrix is symmetric, max |S - S^T| = "
    f"{float(abs(scores_k_is_q - scores_k_is_q.transpose(0, 1, 3, 2)).max()):.1f} (with the real k: {asymmetry:.1f})")

notebook_batch, notebook_heads, notebook_gpus = 4, 4, 2  # small enough to list; the notebook had 64 examples, 8 heads, 2 GPUs
labels = numpy.array([[(b, a) for a in range(notebook_heads)] for b in range(notebook_batch)])  # (batch, heads, 2)
notebook_gpu0 = labels.reshape(notebook_batch * notebook_heads, 2).reshape(notebook_gpus, -1, 2)[0]  # the notebook's reshape, block 0
head_gpu0 = labels[:, :notebook_heads // notebook_gpus].reshape(-1, 2)  # a block of the heads axis, every batch
say(f"   (2) cutting the flattened (batch, head) axis splits the batch; {notebook_batch} examples, {notebook_heads} heads, "
    f"{notebook_gpus} GPUs:")
for name, pairs in (("the notebook's reshape", notebook_gpu0), ("head-parallel", head_gpu0)):
    say(f"       {name + ':':20}GPU 0 gets " + " ".join(f"b{b}h{a}" for b, a in pairs)
        + f" = examples {spans(set(pairs[:, 0]))}, heads {spans(set(pairs[:, 1]))}")
say("   (3) `for i in qs: qs[i].to(...)` indexes a tuple with tensors and drops .to()'s result: nothing moves;")
say("       with MPI nothing needs to: each rank computes its own heads where its weights are")
say("   (4) `torch.cat[gpu1, gpu2]` -> `torch.cat([gpu1, gpu2], dim=-1)`, or, as Megatron, no cat: one all-reduce")
say("   (5) `qkv.reshape(B, S, 3, -1)` reads the columns as [all q | all k | all v]: wrong for a column split (3.)")

# ---------------------------------------------------------------------------------------------------
# 2. Why heads are independent.
#
# The notebook's own argument, checked: q k^T has shape (b, a, s, s) -- b·a separate (s, s) score matrices,
# one per example and head, each made of that head's own q and k. The softmax runs along each row of
# each matrix, and the product with v uses the same head's v. Nothing mixes heads until proj. So
# attention computed on any group of heads alone gives exactly those heads' columns of the result.
# ---------------------------------------------------------------------------------------------------
say("\n2. Why heads are independent")
context = attention_core(Tensor(q), Tensor(k), Tensor(v), causal=True, dropout=None).data
halves = [slice(0, heads // 2), slice(heads // 2, heads)]
pieces = [attention_core(Tensor(q[:, h]), Tensor(k[:, h]), Tensor(v[:, h]), causal=True, dropout=None).data
          for h in halves]
difference = float(abs(backend.xp.concatenate(pieces, axis=1) - context).max())
say(f"   q k^T is {scores.shape}: {batch}×{heads} separate (s, s) score matrices, one per (example, head)")
say(f"   attention on heads 0-{heads // 2 - 1} alone and {heads // 2}-{heads - 1} alone, side by side, vs all "
    f"{heads} at once: max difference {difference:.1e}")

# ---------------------------------------------------------------------------------------------------
# 3. Head-major columns: a block of qkv's columns is a set of whole heads.
#
# The column-parallel qkv gives rank r a contiguous block of 3h/t output columns. For that block to
# hold whole heads -- each head's q, k AND v -- the columns must be ordered head by head:
# [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]. That is MultiHeadAttention's order. With the notebook's (and torch's
# usual) order [all q | all k | all v], the same block would hold some heads' q and other heads' k:
# no head could be computed without the other ranks. The output projection's input is the heads'
# outputs side by side, head i in features [d·i, d·(i+1)): rank r takes those rows of proj.
# ---------------------------------------------------------------------------------------------------
say("\n3. Head-major qkv columns: each rank's column block holds whole heads")
first, last = rank * heads_per_rank, (rank + 1) * heads_per_rank  # this rank's heads [first, last)
columns = range(3 * head_dim * first, 3 * head_dim * last)
qkv_order = {part: {(c % hidden) // head_dim for c in columns if c // hidden == i} for i, part in enumerate("qkv")}
each_rank(f"heads {spans(range(first, last))}: qkv columns {columns.start}:{columns.stop}, proj rows "
          f"{head_dim * first}:{head_dim * last}   ([q|k|v] order would give it "
          + " ".join(f"{part}{spans(found)}" for part, found in qkv_order.items() if found) + ")")

# ---------------------------------------------------------------------------------------------------
# 4. ParallelAttention: MultiHeadAttention's forward, with a/t heads and parallel layers.
#
# qkv is a ColumnParallelLinear (entered through f: identity forward, all-reduce of dX backward), proj
# a RowParallelLinear (left through f̄: all-reduce forward). In between, the attention core runs on the
# rank's heads alone. Built from the same seed, each rank draws only its blocks of the serial weights
# (every value is a function of its global index: minitp.nn.init), so there is nothing to load.
# ---------------------------------------------------------------------------------------------------
say("\n4. ParallelAttention on each rank: its heads, end to end, with no communication until proj")
parallel = ParallelAttention(hidden, heads, causal=True, attention_dropout=attention_dropout,
                             dropout=output_dropout, seed=0, dtype=dtype, group=mesh.tp)
each_rank(f"heads {first}..{last - 1}, {parallel.heads} heads: qkv.weight {parallel.qkv.weight.shape}, "
          f"q/k/v {(batch, parallel.heads, seq, head_dim)}, scores {(batch, parallel.heads, seq, seq)}, "
          f"proj.weight {parallel.proj.weight.shape}")

# ---------------------------------------------------------------------------------------------------
# 5. The causal mask and attention dropout: the rank's heads' slice of the serial masks.
#
# The causal mask (query i sees keys j <= i) depends only on positions: every head gets the same one,
# rebuilt from the shape. Attention dropout is the subtle one: the serial model drops elements of its
# (b, a, s, s) probabilities, and a rank holding heads [first, last) must drop exactly those elements
# of its (b, a/t, s, s) block, or the sharded model is a different model. minitp's dropout mask is a
# pure function of (seed, call counter, the element's index in the GLOBAL tensor), so a rank draws its
# block by saying where it sits: along axis 1 (the heads), block r of t -- the attention dropout's
# ``splits`` = ((1, r, t),), which TensorParallelLayers gave it. We draw both masks here the way
# the modules will on their first call, and compare; each rank shows its first head's pattern.
# ---------------------------------------------------------------------------------------------------
say("\n5. Causal mask and attention dropout: each rank draws its heads' slice of the serial mask")
say(f"   (each group of {seq} is one query's row of keys: x attended, . a future key, o dropped)")
global_shape = (batch, heads, seq, seq)
ones = backend.xp.ones(global_shape, dtype=dtype)
serial_keep = F.dropout(Tensor(ones), attention_dropout, serial.attention_dropout.seed,
                        serial.attention_dropout.counter).data != 0
rank_keep = F.dropout(Tensor(ones[:, first:last]), attention_dropout, parallel.attention_dropout.seed,
                      parallel.attention_dropout.counter, global_shape=global_shape,
                      offset=(0, first, 0, 0)).data != 0
masks_agree = bool((rank_keep == serial_keep[:, first:last]).all())
causal = F.causal_mask(Tensor(backend.xp.zeros((seq, seq), dtype=dtype))).data == 0  # True: key j <= query i
pattern = " ".join("".join("x" if keep and allowed else ("o" if allowed else ".")
                           for keep, allowed in zip(keep_row, causal_row))
                   for keep_row, causal_row in zip(backend.to_host(rank_keep[0, 0]), backend.to_host(causal)))
each_rank(f"head {first}, example 0: {pattern}   mask of heads {spans(range(first, last))} "
          f"== serial mask[:, {first}:{last}]: {masks_agree}")

# ---------------------------------------------------------------------------------------------------
# 6. The run, and what crosses the wire.
#
# Forward: the only collective is f̄ after proj, summing the ranks' partial outputs Z_r = context_r
# proj_r (an s×b×h tensor). Backward: the only collective is f's, before qkv, summing the ranks'
# contributions to dL/dX (each rank's heads saw all of X). The same count as the MLP: one each way.
# ---------------------------------------------------------------------------------------------------
say("\n6. Forward and backward: the collectives")
x_parallel = Tensor(x_values, requires_grad=True)
with comm.log_collectives() as forward_log:
    z_parallel = parallel(x_parallel)
with comm.log_collectives() as backward_log:
    z_parallel.backward(grad_z)
say("   forward (f̄ after proj):")
say(indent(forward_log.table()))
say("   backward (f before qkv):")
say(indent(backward_log.table()))
payload = seq * batch * hidden * numpy.dtype(dtype).itemsize
say(f"   one all-reduce each way, of S = s·b·h·8 = {payload:,} B; ring 2(n-1)/n·S = "
    f"{2 * (tp_size - 1) / tp_size * payload:,.0f} B per rank;")
say("   the attention core between them (scores, mask, softmax, dropout, @ v) communicates nothing")

# ---------------------------------------------------------------------------------------------------
# 7. The proof: the output and every gradient equal the serial MultiHeadAttention's.
#
# The serial model runs once with the same input and the same gradient from above; its dropouts are on
# their first call, as the parallel model's were. Rank r's parameter gradients cover its heads only;
# gather_serial_grads all-gathers them into serial shapes. Every rank checks, and an all-reduce of the
# worst error gives every rank the same verdict.
# ---------------------------------------------------------------------------------------------------
say("\n7. The proof: head-parallel vs serial, max |error|")
x_serial = Tensor(x_values, requires_grad=True)
z_serial = serial(x_serial)
z_serial.backward(grad_z)
grads = gather_serial_grads(parallel, mesh.tp)
errors = {"Z": max_error(z_parallel, z_serial), "dX": max_error(x_parallel.grad, x_serial.grad)}
errors.update({f"d{name}": max_error(grads[name], parameter.grad) for name, parameter in serial.named_parameters()})
say("   " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
worst = mesh.world.comm.allreduce(max(errors.values()), op=MPI.MAX)
masks_agree = mesh.world.comm.allreduce(masks_agree, op=MPI.LAND)
one_each_way = (forward_log.count() == forward_log.count("all_reduce") == 1
                and backward_log.count() == backward_log.count("all_reduce") == 1)

# ---------------------------------------------------------------------------------------------------
# Where this leads: attention and the MLP together make the tensor-parallel transformer layer,
# minitp.parallel.ParallelTransformerBlock -- 2 all-reduces forward and 2 backward per layer, each of
# s×b×h (Shoeybi et al.). Its sequence_parallel=True (Korthikanti et al. 2022) then splits the LayerNorms
# and dropouts, which tensor parallelism leaves replicated, along the sequence, and replaces each
# all-reduce by a reduce-scatter and an all-gather: the same bytes, and activations divided by t.
# ---------------------------------------------------------------------------------------------------
say("\nnext: minitp.parallel.ParallelTransformerBlock joins attention and the MLP (2 all-reduces each way per")
say("      layer); with sequence_parallel=True each becomes a reduce-scatter + an all-gather")
verdict(worst <= 1e-12 and masks_agree and one_each_way,
        f"head-parallel attention == serial MultiHeadAttention (max error {worst:.1e}, output and all "
        f"gradients) on {ranks(tp_size)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12), dropout masks agree: {masks_agree}, collectives "
                f"forward {forward_log.count()}, backward {backward_log.count()} (must be 1 all-reduce each)")
