"""One transformer layer with tensor AND sequence parallelism, rank by rank, proven equal to the serial layer.

    mpirun -n 4 python tutorials/transformer.py        (1, 2 or 3 ranks work too)

The pieces are in the earlier tutorials: mlp.py splits the MLP (columns, then rows), attention.py splits
attention by heads, sequence_parallel.py splits LayerNorm and dropout along the sequence. Here they are
one pre-LayerNorm GPT block, ``ParallelTransformerBlock(sequence_parallel=True)`` -- the layer of
Korthikanti et al. 2022, section 4.2.2 -- causal, with dropout p = 0.1 on the attention probabilities
and on both residual branches:

    x (s/t, b, h) -> ln1 -> g -> attention (a/t heads)  -> ḡ -> dropout -> + x      = x'
    x'(s/t, b, h) -> ln2 -> g -> MLP (ffn/t columns)    -> ḡ -> dropout -> + x'     = y (s/t, b, h)

Between the two halves every rank holds s/t tokens (the sequence-parallel region); inside attention and
the MLP it holds all s tokens but a/t heads or ffn/t columns (the tensor-parallel region). g (all-gather
along s) leads from the first into the second, ḡ (reduce-scatter along s) back out. We watch it run:

    1. what each rank holds: its blocks of the weights
    2. the block's input enters the sequence-parallel region
    3. what each rank holds at each stage of the forward pass
    4. the collectives, in order, forward and backward
and the check: the output, the input's gradient and every parameter's gradient equal the serial
TransformerBlock's, within 1e-12 in float64.

Every rank runs this file; rank 0 prints (say, from minitp.report), and what each rank holds is gathered
to rank 0 into tables with one column per rank.
"""
import numpy
from mpi4py import MPI

from minitp import Tensor, backend, comm
from minitp.nn import TransformerBlock
from minitp.parallel import (ParallelTransformerBlock, gather_serial_grads,
                             scatter_to_sequence_parallel_region)
from minitp.report import banner, indent, ranks, say, verdict
from minitp.testing import max_error

mesh = comm.init(tp=MPI.COMM_WORLD.Get_size(), checked=True)  # all ranks in one tensor-parallel group: one model, t shards
tp_size, rank = mesh.tp.size, mesh.tp.rank


def span(first, count, noun):
    """"tokens 3-5" for ``count`` items from ``first``; "token 3" for one."""
    return f"{noun} {first}" if count == 1 else f"{noun}s {first}-{first + count - 1}"


def rank_table(rows, header, shape_header="shape"):
    """A table with one column per rank: ``rows`` are this rank's (label, shape, cell) triples, the same
    labels and shapes on every rank. Each rank sends its rows to rank 0 (mpi4py's pickling gather: a few
    words, not model data), which prints label | shape | rank 0 | rank 1 | ... and returns whether every
    rank reported the same shapes (the other ranks get None)."""
    everyone = mesh.world.comm.gather(rows, root=0)
    if mesh.rank != 0:
        return None
    same_shapes = all([row[:2] for row in theirs] == [row[:2] for row in rows] for theirs in everyone)
    lines = [(header, shape_header, *[f"rank {r}" for r in range(len(everyone))])]
    lines += [(label, str(shape), *[theirs[i][2] for theirs in everyone]) for i, (label, shape, _) in enumerate(rows)]
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    for line in lines:
        print("   " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip(), flush=True)
    return same_shapes


# The sizes of the other tutorials: 12 tokens and 12 heads of 2 features divide among 1, 2, 3 or 4 ranks,
# as does ffn = 4h = 96. float64, so that sharded and serial results agree to rounding error.
seq, batch, heads, head_dim = 12, 2, 12, 2
hidden, ffn_hidden, p = heads * head_dim, 4 * heads * head_dim, 0.1
dtype = numpy.float64
try:
    tokens_per_rank = comm.divide(seq, tp_size, "seq (tokens split over the ranks)")
    heads_per_rank = comm.divide(heads, tp_size, "heads")
    ffn_per_rank = comm.divide(ffn_hidden, tp_size, "ffn_hidden")
except ValueError as error:  # every rank computes the same numbers, so every rank stops here, together
    say(f"{error}.\nThis tutorial runs on 1, 2, 3, 4, 6 or 12 ranks: mpirun -n 4 python tutorials/transformer.py")
    raise SystemExit(1)
my_tokens = span(rank * tokens_per_rank, tokens_per_rank, "token")
all_tokens = f"all {seq} tokens"

banner(f"one transformer block, tensor + sequence parallel over {ranks(tp_size)}")
say(f"sizes: seq s={seq}, batch b={batch}, hidden h={hidden}, heads a={heads} of d={head_dim}, ffn={ffn_hidden}, "
    f"{numpy.dtype(dtype).name}; causal; dropout p={p} (attention probabilities and both residual branches)")

# ---------------------------------------------------------------------------------------------------
# 1. The serial block, and each rank's blocks of its weights.
#
# Every rank builds the serial TransformerBlock from the same seed (the reference), then the parallel
# block from that seed too: it is the same TransformerBlock, built from tensor-parallel layers, and each
# of those draws only the rank's block of the serial weights (a value is a function of the seed, its
# name and its global index: minitp.nn.init), so nothing is loaded and no rank holds a whole weight
# it does not own: qkv and fc1 by columns
# (the column-parallel layers; qkv's columns are head-major, so a block of them is a set of whole heads),
# proj and fc2 by rows (row-parallel). The rest is replicated, whole on every rank: both LayerNorms and
# the biases of proj and fc2, which are added once, after the sum over ranks. Under sequence parallelism
# these replicated weights meet only the rank's tokens, so their gradients are all-reduced in backward
# (sequence_parallel.py, section 5).
# ---------------------------------------------------------------------------------------------------
say("\n1. Each rank's blocks of the serial weights (each rank draws only its own)")
serial = TransformerBlock(hidden, heads, ffn_hidden, causal=True, dropout=p, attention_dropout=p, seed=0,
                          dtype=dtype)
block = ParallelTransformerBlock(hidden, heads, ffn_hidden, causal=True, dropout=p, attention_dropout=p, seed=0,
                                 dtype=dtype, sequence_parallel=True, group=mesh.tp)


def block_of(parameter):
    """Which block of the serial weight this rank holds, e.g. "[:, 18:36]"; "all" when replicated.
    (A sharded parameter's ``split_axis`` is the axis it was cut along, rank r holding block r of t; a
    replicated one has ``split_axis`` None, or none at all when it comes from a serial layer, as the
    LayerNorms' do.)"""
    axis = getattr(parameter, "split_axis", None)
    if axis is None:
        return "all"
    width = parameter.shape[axis]
    index = [":"] * parameter.ndim
    index[axis] = f"{rank * width}:{(rank + 1) * width}"
    return f"[{', '.join(index)}]"


serial_shapes = {name: parameter.shape for name, parameter in serial.named_parameters()}
rank_table([(name, serial_shapes[name], block_of(parameter)) for name, parameter in block.named_parameters()],
           "parameter", "serial shape")

# ---------------------------------------------------------------------------------------------------
# 2. Entering the sequence-parallel region.
#
# The block's input x (s, b, h) arrives replicated here: every rank draws the same numbers, as every rank
# would hold the same output of a replicated embedding. scatter_to_sequence_parallel_region keeps the
# rank's tokens [r·s/t, (r+1)·s/t) -- a view, nothing sent -- and its backward all-gathers the tokens'
# gradients, so x.grad comes out whole on every rank. (A vocab-parallel embedding can skip the detour:
# it ends in ḡ, a reduce-scatter, and leaves its output already split by tokens.)
#
# To see what each rank holds at each stage, we wrap the forward of each sublayer so that it notes the
# shape it returns -- a spy: the computation is untouched.
# ---------------------------------------------------------------------------------------------------
say("\n2. The input enters the sequence-parallel region: each rank keeps its tokens")
rng = numpy.random.default_rng(0)
x_values = backend.from_host(rng.standard_normal((seq, batch, hidden)))
grad_y = backend.from_host(rng.standard_normal((seq, batch, hidden)))  # dL/dy from the layers above

stages = []  # (stage, shape, what this rank holds), in the order the block runs


def watch(module, stage, holds):
    """Note, every time ``module`` runs, the stage's name, the shape of its output and ``holds`` -- which
    part of the whole this rank's output is."""
    run = module.forward

    def forward(*args, **kwargs):
        output = run(*args, **kwargs)
        stages.append((stage, tuple(output.shape), holds))
        return output
    module.forward = forward


first_head, first_column = rank * block.attention.heads, rank * ffn_per_rank
my_heads = span(first_head, block.attention.heads, "head")
my_columns = f"ffn {first_column}-{first_column + ffn_per_rank - 1}"
watch(block.ln1, "ln1 (its tokens, no communication)", my_tokens)
watch(block.attention.qkv, "g, then qkv: all tokens, its heads", my_heads)
watch(block.attention.attention_dropout, "softmax(q kᵀ/√d), causal, dropout", my_heads)
watch(block.attention.proj, "proj: partial sums, ḡ", my_tokens)
watch(block.attention.dropout, "dropout, then + x", my_tokens)
watch(block.ln2, "ln2", my_tokens)
watch(block.mlp.fc1, "g, then fc1: all tokens, its columns", my_columns)
watch(block.mlp.gelu, "GeLU", my_columns)
watch(block.mlp.fc2, "fc2: partial sums, ḡ", my_tokens)
watch(block.mlp.dropout, "dropout, then + x' = y", my_tokens)

x = Tensor(x_values, requires_grad=True)
stages.append(("x, the block's input (replicated)", tuple(x.shape), all_tokens))
with comm.log_collectives() as forward_log:
    x_mine = scatter_to_sequence_parallel_region(x, mesh.tp, tag="block input")
    stages.append(("scatter: enter the SP region", tuple(x_mine.shape), my_tokens))
    y = block(x_mine)
with comm.log_collectives() as backward_log:
    y.backward(comm.split(grad_y, mesh.tp, axis=0))  # dL/dy of this rank's tokens
say(f"   x {tuple(x.shape)} on every rank -> rank r keeps tokens [r·{tokens_per_rank}, (r+1)·{tokens_per_rank}): "
    f"{tuple(x_mine.shape)}, a view, nothing sent")

# ---------------------------------------------------------------------------------------------------
# 3. What each rank holds, stage by stage.
#
# Read down a column: a rank starts with its tokens, runs ln1 on them alone, then g (inside qkv, which
# gathers its input itself) hands it all s tokens for the GEMM with its qkv columns -- its heads' q, k
# and v. The attention core ((b, a/t, s, s) scores, causal mask, softmax, dropout) is its heads' alone.
# proj multiplies its heads' outputs by its rows: a partial sum of the whole (s, b, h) output, which ḡ
# sums over the ranks and scatters by tokens, so the residual dropout and the "+ x" run on its tokens
# again. The MLP repeats the pattern with ffn columns instead of heads. Every shape is measured.
# ---------------------------------------------------------------------------------------------------
say("\n3. What each rank holds at each stage of the forward pass")
shapes_agree = rank_table(stages, "stage")
shapes_agree = mesh.world.comm.bcast(shapes_agree, root=0)

# ---------------------------------------------------------------------------------------------------
# 4. The collectives, in order.
#
# Forward: g and ḡ around attention, then around the MLP -- 2 all-gathers and 2 reduce-scatters of an
# s×b×h tensor, where tensor parallelism alone would do 2 all-reduces: the same ring bytes (an all-reduce
# is a reduce-scatter followed by an all-gather). The scatter at the entrance sends nothing.
# Backward, walking the graph from y back to x:
#   - ḡ's backward all-gathers the MLP output's gradient (every rank's fc2 rows need all tokens' dY);
#   - g's backward reduce-scatters fc1's input gradient (each rank's columns gave a partial dX of all
#     tokens; summed, each rank keeps its tokens);
#   - the re-gather of X for dA: fc1 kept its input as the rank's tokens, and dA = Xᵀ dY needs all of
#     them -- the price of storing it sharded (sequence_parallel.py, sections 3 and 4);
#   - the same three for attention;
#   - the scatter's backward, at the entrance: x's gradient, all-gathered whole on every rank;
#   - all-reduces of h numbers: the replicated LayerNorm weights and biases and the row-parallel biases
#     each met only the rank's tokens, and the backward of a copy is a sum.
# ---------------------------------------------------------------------------------------------------
say("\n4. The collectives, in the order they ran")
say("   forward:")
say(indent(forward_log.table()))
say("   backward:")
say(indent(backward_log.table()))
if tp_size == 1:
    say("   (one rank: every collective is a no-op that sends nothing; run with 2 or 4 ranks)")

# ---------------------------------------------------------------------------------------------------
# The check: the TP+SP block computes exactly the serial block.
#
# The serial block runs once with the same x and dL/dy; its dropouts are on their first call, as the
# parallel block's were, so all masks agree (each rank draws its tokens' or its heads' slice). The
# rank's output must be its tokens' rows of the serial output; x.grad, gathered by the scatter's
# backward, the whole serial dL/dx; and every parameter's gradient, its blocks gathered back into serial
# shapes by gather_serial_grads, the serial one. An all-reduce of the worst error gives every rank the
# same verdict, so they stop together if it fails.
# ---------------------------------------------------------------------------------------------------
say("\nThe check: TP+SP block vs serial TransformerBlock, max |error|")
x_serial = Tensor(x_values, requires_grad=True)
y_serial = serial(x_serial)
y_serial.backward(grad_y)
grads = gather_serial_grads(block, mesh.tp)
errors = {"y, each rank's tokens": max_error(y, comm.split(y_serial.data, mesh.tp, axis=0)),
          "dL/dx, whole on every rank": max_error(x.grad, x_serial.grad)}
errors.update({f"d {name}": max_error(grads[name], parameter.grad) for name, parameter in serial.named_parameters()})
worst_per_check = {name: mesh.world.comm.allreduce(error, op=MPI.MAX) for name, error in errors.items()}
for name, error in worst_per_check.items():
    say(f"   {name:34}{error:9.1e}")
worst = max(worst_per_check.values())
counts = {"forward all-gathers": forward_log.count("all_gather"),
          "forward reduce-scatters": forward_log.count("reduce_scatter"),
          "backward re-gathers": backward_log.count("all_gather", "re-gather")}
as_designed = counts == {"forward all-gathers": 2, "forward reduce-scatters": 2, "backward re-gathers": 2}

say("\nThat is the whole layer: a GPT stacks such layers between its embedding and its logits, each one the same")
say("pattern -- tokens split between the halves, heads or columns split inside them, g and ḡ at the seams.")
verdict(worst <= 1e-12 and shapes_agree and as_designed,
        f"TP+SP block == serial TransformerBlock (max error {worst:.1e}, output, input gradient and all "
        f"{len(grads)} parameter gradients) on {ranks(tp_size)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12); shapes agree on every rank: {shapes_agree}; "
                f"collectives {counts} (must be 2 each)")
