"""Context parallelism: the whole sequence split over ranks -- ring attention with a log-sum-exp merge, the
zigzag that balances its causal work, and Ulysses' all-to-all -- proven equal to serial attention.

    mpirun -n 4 python tutorials/context_parallel.py        (1 or 2 ranks work too)

Read tutorials/sequence_parallel.py first. Sequence parallelism splits LayerNorm and dropout along the
sequence and gathers it back for every GEMM: the attention block still sees all s tokens on every rank.
Context parallelism never gathers: each of the cp ranks holds s/cp tokens of EVERY activation, so a
sequence cp times longer fits. Everything a transformer does is token by token -- embeddings, LayerNorm,
the GEMMs, GeLU, dropout, the loss -- except attention, where a query meets every earlier key. So this
file is about attention only:

    1. which tokens each rank holds: contiguous blocks, or zigzag -- and the causal work each rank does
    2. the log-sum-exp merge: attention over two blocks of keys, computed apart, combined exactly
    3. the ring: each rank keeps its queries while the key/value blocks travel; what each step computes
    4. the bytes of the ring and of Ulysses, from the collective log, against their formulas
    5. what each rank keeps for backward: no s×s block at all
and ends with the check: ring attention (contiguous and zigzag) and Ulysses equal serial causal attention,
forward and backward, and a whole GPT split by zigzag equals the serial GPT.
"""
import numpy
from mpi4py import MPI

from minitp import Tensor, backend, comm, nn, track_saved
from minitp.nn import GPT, GPTConfig, placement
from minitp.parallel import (ParallelGPT, all_reduce_gradients, attended_pairs, average_over_data_parallel,
                             gather_serial_grads, ring_attention, ring_schedule, ulysses_attention)
from minitp.report import banner, each_rank, indent, ranks, say, verdict
from minitp.testing import max_error

mesh = comm.init(cp=MPI.COMM_WORLD.Get_size())  # all ranks hold blocks of one sequence
cp, rank = mesh.cp.size, mesh.cp.rank

# 16 tokens cut into 2·cp chunks for cp = 1, 2, 4 (8); 4 heads split by Ulysses over cp = 1, 2, 4.
seq, batch, heads, head_dim = 16, 1, 4, 2
try:
    comm.divide(seq, 2 * cp, "seq (zigzag cuts it into 2·cp chunks)")
    comm.divide(heads, cp, "heads (Ulysses gives each rank a/cp of them)")
except ValueError as error:  # every rank computes the same numbers, so every rank stops here, together
    say(f"{error}.\nThis tutorial runs on 1, 2 or 4 ranks: mpirun -n 4 python tutorials/context_parallel.py")
    raise SystemExit(1)
banner(f"context parallelism over {ranks(cp)}")
say(f"sizes: seq s={seq}, batch b={batch}, heads a={heads} of d={head_dim}, float64; causal attention")


def spans(where):
    """[0, 1, 2, 7] -> "0-2, 7"."""
    runs = []
    for n in where:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def held(layout, r=rank):
    """The global positions of rank r's tokens, in its order."""
    return placement.positions([(r, cp, layout)], seq // cp)[1]


# ---------------------------------------------------------------------------------------------------
# 1. Which tokens each rank holds, and the causal work that follows.
#
# Contiguous: rank r holds tokens [r·s/cp, (r+1)·s/cp). Under the causal mask query i attends keys 0..i,
# so rank 0's queries see only their own block, and the last rank's see everything: with blocks of C
# tokens rank r attends r·C² + C(C+1)/2 (query, key) pairs -- the last rank about 2cp - 1 times the
# first. Every rank waits for the slowest. Zigzag cuts the sequence into 2·cp chunks of c tokens and gives
# rank r chunks r and 2cp-1-r: an early chunk and its mirror image late one. Chunk i attends i·c² + c(c+1)/2
# pairs, so rank r attends (r + 2cp-1-r)·c² + c(c+1) -- the same for every rank.
# ---------------------------------------------------------------------------------------------------
say("\n1. Which tokens each rank holds, and the (query, key) pairs it attends under the causal mask")
work = {layout: [attended_pairs(r, cp, seq, layout) for r in range(cp)] for layout in placement.LAYOUTS}
each_rank(f"contiguous: tokens {spans(held('contiguous')):6} {work['contiguous'][rank]:4} pairs  |  "
          f"zigzag: tokens {spans(held('zigzag')):12} {work['zigzag'][rank]:4} pairs")
for layout in placement.LAYOUTS:
    say(f"   {layout:10}: the busiest rank attends {max(work[layout]) / min(work[layout]):.2f}× the idlest's pairs "
        f"(all ranks together: {sum(work[layout])} = s(s+1)/2, every causal pair once)")

# ---------------------------------------------------------------------------------------------------
# 2. The log-sum-exp merge.
#
# softmax needs the sum over ALL of a query's keys -- but not all at once. Attention over a block B of
# keys gives a normalised output O_B and lse_B = log Σ_{j∈B} exp(s_ij), the log of the softmax's
# denominator restricted to B. Denominators of disjoint blocks add, so two blocks combine exactly:
#
#     lse = log(e^lse_1 + e^lse_2)           O = e^(lse_1 - lse) O_1 + e^(lse_2 - lse) O_2
#
# Here, on every rank alike, one query row against 8 keys, split 5 + 3 -- written out in numpy.
# ---------------------------------------------------------------------------------------------------
say("\n2. The log-sum-exp merge: attention over keys 0-4 and keys 5-7 apart, then combined")
rng = numpy.random.default_rng(0)
scores, values = rng.standard_normal(8), rng.standard_normal((8, head_dim))


def attend(block_scores, block_values):
    """(the normalised output, lse) over one block of keys, the max subtracted so nothing overflows."""
    top = block_scores.max()
    weights = numpy.exp(block_scores - top)
    return weights @ block_values / weights.sum(), top + numpy.log(weights.sum())


(out_1, lse_1), (out_2, lse_2) = attend(scores[:5], values[:5]), attend(scores[5:], values[5:])
top = max(lse_1, lse_2)
lse = top + numpy.log(numpy.exp(lse_1 - top) + numpy.exp(lse_2 - top))  # log(e^lse_1 + e^lse_2), stably
merged = numpy.exp(lse_1 - lse) * out_1 + numpy.exp(lse_2 - lse) * out_2
whole, _ = attend(scores, values)
say(f"   O_1 = {numpy.round(out_1, 4)}, lse_1 = {lse_1:.4f};  O_2 = {numpy.round(out_2, 4)}, lse_2 = {lse_2:.4f}")
say(f"   merged {numpy.round(merged, 4)} vs all 8 keys at once {numpy.round(whole, 4)}: "
    f"max difference {abs(merged - whole).max():.1e}")

# ---------------------------------------------------------------------------------------------------
# 3. The ring.
#
# Each rank keeps its queries. At step t it holds the keys and values of rank (r - t) mod cp, attends its
# queries to them -- pair of runs by pair of runs: wholly in the past (no mask), on the diagonal (masked),
# or wholly in the future (skipped) -- merges by lse, and passes the block to rank r + 1 while receiving
# the next from rank r - 1: one sendrecv of K and V stacked per step, cp - 1 of them.
# Backward recomputes each block's probabilities from the saved lse, P = exp(q kᵀ/√d - lse), keeps dQ
# at home, and sends each block's dK, dV around with it and then home to its owner.
# ---------------------------------------------------------------------------------------------------
say("\n3. The ring (zigzag): at step t rank r attends its queries to rank (r-t) mod cp's keys")
mine = held("zigzag")
for step, (source, blocks) in enumerate(ring_schedule(rank, cp, seq, "zigzag")):
    done = [f"q {spans(range(*b.q_run))} × k {spans(range(*b.k_run))} {'masked' if b.masked else 'full'}" for b in blocks]
    skipped = len(placement.runs(rank, cp, seq, "zigzag")) * len(placement.runs(source, cp, seq, "zigzag")) - len(blocks)
    each_rank(f"step {step}: K,V of rank {source} (tokens {spans(held('zigzag', source))}): " + "; ".join(done)
              + (f"; {skipped} pair{'s' * (skipped > 1)} of runs in the future skipped" if skipped else ""))

# ---------------------------------------------------------------------------------------------------
# 4. The bytes, from the collective log.
#
# Ring: K and V of s/cp tokens (2·(s/cp)·b·h numbers, h = a·d) make cp - 1 hops forward; backward they
# make them again and each block's dK, dV accumulator makes cp - 1 hops home: 2(cp-1)·(s/cp)·b·h·e sent
# per rank forward, twice that backward -- the same however the tokens are placed, and NOT shrinking as
# cp grows. Ulysses: one all-to-all of q, k, v (each rank sends (cp-1)/cp of its 3·(s/cp)·b·h numbers),
# one of the output, and the same backward: 4(cp-1)/cp·(s/cp)·b·h·e each way, 2/cp of the ring's.
# ---------------------------------------------------------------------------------------------------
say("\n4. The bytes each rank sends, per layer, from the collective log")
q, k, v = (rng.standard_normal((batch, heads, seq, head_dim)) for _ in range(3))
upstream = rng.standard_normal(q.shape)


def cut(array, layout):
    """This rank's tokens of a serial (b, a, s, d) host array, in its order, where the model's arrays live."""
    return backend.from_host(numpy.ascontiguousarray(array[:, :, held(layout)]))


def run(kind):
    """Ring ("contiguous" or "zigzag" placement) or Ulysses on this rank's tokens: output, input gradients,
    the forward's and backward's collective logs, the bytes kept for backward."""
    layout = "contiguous" if kind == "ulysses" else kind
    leaves = [Tensor(cut(x, layout), requires_grad=True) for x in (q, k, v)]
    with comm.log_collectives() as forward, track_saved() as kept:
        if kind == "ulysses":
            out = ulysses_attention(*leaves, group=mesh.cp)
        else:
            out = ring_attention(*leaves, group=mesh.cp, layout=layout)
    with comm.log_collectives() as backward:
        out.backward(cut(upstream, layout))
    return out, [leaf.grad for leaf in leaves], forward, backward, kept.total


results = {kind: run(kind) for kind in ("contiguous", "zigzag", "ulysses")}
block = (seq // cp) * batch * heads * head_dim * 8  # (s/cp)·b·h·e: float64
formulas = {"ring": (2 * (cp - 1) * block, 4 * (cp - 1) * block), "ulysses": (4 * (cp - 1) / cp * block,) * 2}
for kind, name in (("zigzag", "ring"), ("ulysses", "ulysses")):
    _, _, forward, backward, _ = results[kind]
    say(f"   {name}: forward {forward.total_ring_bytes():,.0f} B in {len(forward)} messages (formula "
        f"{formulas[name][0]:,.0f}), backward {backward.total_ring_bytes():,.0f} B in {len(backward)} "
        f"(formula {formulas[name][1]:,.0f})")
say("   the ring's forward, rank 0's log:")
say(indent(results["zigzag"][2].table()))
if cp == 1:
    say("   (one rank: nothing to send; run with 2 or 4 ranks)")

# ---------------------------------------------------------------------------------------------------
# 5. What each rank keeps for backward.
#
# Serial attention keeps its (b, a, s, s) probabilities -- the term that grows with s². The ring keeps
# q, k, v, its output and one lse per query: (4d + 1)·(s/cp)·b·a numbers, 1/cp of the cp = 1 figure and
# no s×s block at all (the probabilities are recomputed, block by block, from the lse).
# ---------------------------------------------------------------------------------------------------
with track_saved() as serial_kept:
    nn.attention_core(*(Tensor(backend.from_host(x), requires_grad=True) for x in (q, k, v)), causal=True, dropout=None)
ring_kept = results["zigzag"][4]
say(f"\n5. Bytes kept for backward: serial attention {serial_kept.total:,} B; ring attention {ring_kept:,} B "
    f"per rank = (4d + 1)·(s/cp)·b·a·e = {(4 * head_dim + 1) * (seq // cp) * batch * heads * 8:,} B")

# ---------------------------------------------------------------------------------------------------
# The check: every rank's output rows and q, k, v gradient rows equal serial causal attention's, for the
# ring (both placements) and Ulysses; and a 2-layer GPT whose every activation is split by zigzag (dropout
# on, attention dropout included) has the serial loss and, after the dp × cp gradient all-reduce, every
# serial gradient.
# ---------------------------------------------------------------------------------------------------
serial = [Tensor(backend.from_host(x), requires_grad=True) for x in (q, k, v)]
expected = nn.attention_core(*serial, causal=True, dropout=None)
expected.backward(backend.from_host(upstream))
errors = {}
for kind, (out, grads, *_) in results.items():
    layout = "contiguous" if kind == "ulysses" else kind
    errors[kind] = max([max_error(out, cut(backend.to_host(expected.data), layout))]
                       + [max_error(grad, cut(backend.to_host(reference.grad), layout))
                          for grad, reference in zip(grads, serial)])

config = GPTConfig(vocab=16, seq_len=seq, hidden=heads * head_dim, heads=heads, layers=2, dropout=0.1, dtype="float64")
ids = rng.integers(0, 16, (seq + 1, 2))
serial_gpt, gpt = GPT(config), ParallelGPT(config, mesh, context_parallel="zigzag")
serial_loss = serial_gpt.loss(ids[:-1], ids[1:])
serial_loss.backward()
loss = gpt.loss(ids[:-1], ids[1:])  # each rank: the mean over its own tokens
loss.backward()
all_reduce_gradients(gpt, mesh)  # the mean over the cp ranks of their gradients
mean_loss = average_over_data_parallel(loss.item(), mesh)  # the mean over the cp ranks: the global mean
grads = gather_serial_grads(gpt, mesh.tp)
errors["GPT (zigzag)"] = max([abs(mean_loss - serial_loss.item())]
                             + [max_error(grads[name], p.grad) for name, p in serial_gpt.named_parameters()])
worst = {name: mesh.world.comm.allreduce(error, op=MPI.MAX) for name, error in errors.items()}
say("\nThe check, max |error| against serial:")
for name, error in worst.items():
    say(f"   {name:14}{error:9.1e}")
ring_bytes_ok = results["zigzag"][2].total_ring_bytes() == formulas["ring"][0] \
    and results["zigzag"][3].total_ring_bytes() == formulas["ring"][1] \
    and results["ulysses"][2].total_ring_bytes() == formulas["ulysses"][0]
balanced = max(work["zigzag"]) == min(work["zigzag"])
top = max(worst.values())
verdict(top <= 1e-12 and ring_bytes_ok and balanced,
        f"ring (contiguous, zigzag) and Ulysses attention == serial, the zigzag GPT == serial GPT "
        f"(max error {top:.1e}), bytes == formulas, zigzag balanced on {ranks(cp)}",
        failure=f"max error {top:.1e} (must be <= 1e-12); bytes == formulas: {ring_bytes_ok}; balanced: {balanced}")
