"""Every axis at once: one training step on a (dp, pp, cp, tp) mesh -- and it is the serial step.

    mpirun -n 8 python tutorials/compose.py                  (dp, pp, cp, tp) = (2, 2, 2, 1)
    mpirun -n 8 python tutorials/compose.py --mesh 1 2 2 2   tp = 2 with sequence parallelism
    mpirun -n 4 python tutorials/compose.py                  fewer ranks: the largest of its meshes that fits

The chapters before took one axis each. Here they meet: the batch's columns over dp replicas (with ZeRO-1
slicing the optimizer state over them), the layers over pp stages run by the 1F1B schedule, the sequence
over cp ranks by ring attention (zigzag by default), and each layer over tp ranks. We watch

    1. the mesh: which ranks form each group, and why each group exists
    2. what each rank holds: its layers, its tokens, its batch columns, its slice of the optimizer state
    3. the step itself: train_step, the same function for every mesh
    4. what crossed the wire in that step, group by group
and the check: the loss, the gradient norm and every updated parameter equal the serial nn.GPT's step on
the whole batch, float64, dropout on.

Every rank runs this file; rank 0 prints (minitp.report), each rank's own lines gathered in rank order.
"""
import argparse
import collections
import math
import textwrap

import numpy
from mpi4py import MPI

from minitp import backend, comm
from minitp.nn import GPT, SGD, GPTConfig, placement
from minitp.parallel import ZeroOptimizer, gather_serial_state
from minitp.pipeline import PipelineGPT
from minitp.report import banner, each_rank, ranks, say, verdict
from minitp.testing import max_error
from minitp.training import Pipelined, train_step

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--mesh", nargs=4, type=int, default=[2, 2, 2, 1], metavar=("DP", "PP", "CP", "TP"),
                    help="the mesh on 8 ranks (default 2 2 2 1); tp > 1 turns sequence parallelism on")
parser.add_argument("--kind", choices=("zigzag", "ring"), default="zigzag",
                    help="context parallelism's placement of the tokens: zigzag (balanced) or ring (contiguous)")
options = parser.parse_args()
AXES = ("dp", "pp", "cp", "tp")


def fitting(sizes, world):
    """The largest of the mesh's shrinkings that fits ``world`` ranks: halve dp, then tp, then cp, then pp
    (the pipeline, this chapter's spine, goes last), until dp·pp·cp·tp = world. None if none fits."""
    sizes = dict(zip(AXES, sizes))
    for axis in ("dp", "tp", "cp", "pp"):
        while math.prod(sizes.values()) > world and sizes[axis] > 1:
            sizes[axis] //= 2
    return sizes if math.prod(sizes.values()) == world else None


world = MPI.COMM_WORLD.Get_size()
asked = dict(zip(AXES, options.mesh))
sizes = fitting(options.mesh, world)
if sizes is None:  # every rank computes the same None, and stops together before any collective
    say(f"(dp, pp, cp, tp) = {tuple(options.mesh)} does not fit {world} ranks: dp·pp·cp·tp must equal the ranks, "
        "and halving its axes does not get there.\n"
        "This tutorial runs on 1, 2, 4 or 8 ranks: mpirun -n 8 python tutorials/compose.py")
    raise SystemExit(1)
mesh = comm.init(**sizes)
grid = tuple(sizes.values())
banner(f"one training step on (dp, pp, cp, tp) = {grid}, {ranks(world)}")
if sizes != asked:
    say(f"(dp, pp, cp, tp) = {tuple(asked.values())} needs {math.prod(options.mesh)} ranks; on {world} this runs "
        f"the largest of its meshes that fits (dp halved first, then tp, cp, pp): {grid}")

# A tiny GPT in float64, dropout 0.1 everywhere (embedding, residual, attention), the token table tied to
# the head: 4 blocks, 2 per stage at pp = 2. A global batch of B = 4 sequences of s = 8 tokens: B/dp columns
# per replica, cut into m = 2 microbatches of b/m = 1 column.
config = GPTConfig(vocab=24, seq_len=8, hidden=16, heads=4, layers=4, dropout=0.1, tie_embeddings=True,
                   seed=7, dtype="float64")
B, m, s = 4, 2, config.seq_len
windows = numpy.random.default_rng(0).integers(0, config.vocab, (s + 1, B))
ids, targets = backend.from_host(windows[:-1]), backend.from_host(windows[1:])  # (s, B), the same on every rank
sp, kind = mesh.tp_size > 1, options.kind if mesh.cp_size > 1 else None
schedule = Pipelined("1f1b", m)
# SGD with momentum keeps one buffer per parameter, and its update p - lr·(momentum buffer) = p - lr·g on
# the first step, so comparing the updated parameters compares the gradients to the last bit. (AdamW's first
# step is lr·g/(|g| + eps): on gradients that are zero in exact arithmetic -- attention's key bias, which
# softmax ignores -- it would magnify rounding noise of 1e-17 into differences of lr·1e-17/eps.)
LR, MOMENTUM, MAX_NORM = 0.1, 0.9, 1.0
say(f"model: {config.layers} blocks, hidden {config.hidden}, {config.heads} heads, vocabulary {config.vocab}, "
    f"tied embeddings, dropout {config.dropout}, float64; batch B = {B} of s = {s} tokens, 1F1B with m = {m} "
    f"microbatches; {kind or 'no'} context parallelism; sequence parallelism {'on' if sp else 'off'}; "
    f"ZeRO-1 around SGD (momentum {MOMENTUM})")
try:  # sizes that do not divide (a --mesh of your own): the same ValueError on every rank, before any send
    model = PipelineGPT(config, mesh, sp, context_parallel=kind)
    optimizer = ZeroOptimizer(SGD(model.named_parameters(), lr=LR, momentum=MOMENTUM), mesh)
    schedule.check(model, mesh, B)
except ValueError as error:
    say(f"{error}.\nTry the default: mpirun -n 8 python tutorials/compose.py")
    raise SystemExit(1)

# ---------------------------------------------------------------------------------------------------
# 1. The mesh.
#
# World rank r sits at ((dp·pp + pp)·cp + cp)·tp + tp: tp innermost, so a layer's shards live on
# neighbouring ranks (one node), dp outermost. A group is the ranks that differ in one coordinate only:
#   tp     the shards of every layer (Megatron): they talk inside every layer, forward and backward --
#          the most traffic, hence the nearest ranks. Without it every layer would have to fit on one rank.
#   cp     blocks of one sequence (ring attention): a query needs every earlier key, so K and V travel
#          the ring. Without it each rank would hold the activations of the whole sequence.
#   pp     the stages of one replica (GPipe, 1F1B): only the boundary activations and their gradients cross.
#          Without it every rank would hold every layer (and its optimizer state).
#   dp     the replicas: the same model on other columns of the batch. Without it, more ranks would not
#          mean more sequences per step.
#   dp×cp  every rank that holds the same parameters (same stage, same tp shard): each computed the gradient
#          of its own tokens, and the gradient of the batch is their mean -- over dp alone the other cp
#          ranks' tokens would be missing. ZeRO-1 slices the optimizer state over this group too.
#   tied   the first and the last stage of one pipeline (same dp, cp, tp): both hold the token table wte,
#          for the lookup and for the head. Without summing its two gradients the copies would drift apart.
# ---------------------------------------------------------------------------------------------------
say("\n1. The mesh: each rank's coordinates, and whom it talks to over which group")
groups = [(mesh.tp, "tp"), (mesh.cp, "cp"), (mesh.pp, "pp"), (mesh.dp, "dp"), (mesh.dp_cp, "dp×cp"),
          (model.embedding_group, "the tied table's group")]
talks = [f"{' '.join(str(r) for r in g.ranks if r != mesh.rank)} over {name}"
         for g, name in groups if g is not None and g.size > 1]
each_rank(", ".join(f"{axis} {mesh.coordinates[axis]}" for axis in AXES) +
          ("; talks to " + "; ".join(talks) if talks else "; talks to no one"))

# ---------------------------------------------------------------------------------------------------
# 2. What each rank holds.
#
# Its stage's blocks (the embeddings with the first, ln_f and the head with the last, the tied copy of wte
# there), drawn from (seed, name, index): the serial model's values, nobody builds the whole. Its tokens:
# zigzag cuts the s positions into 2·cp chunks and gives cp rank r chunks r and 2cp-1-r, an early and a
# late one, so that every rank does the same causal work (ring: one contiguous block, the last rank
# attending to the most keys). Under sequence parallelism the tp ranks split those tokens once more for
# LayerNorm and dropout. Its columns: dp replica d takes columns [d·B/dp, (d+1)·B/dp), fed in m
# microbatches. Its optimizer state: ZeRO-1 flattens the stage's gradients into buckets and gives each
# of the dp·cp ranks holding those parameters one slice of every bucket -- the momentum of 1/(dp·cp) of them.
# ---------------------------------------------------------------------------------------------------
say("\n2. What each rank holds: layers, tokens, batch columns, its ZeRO-1 slice of the optimizer state")


def spans(positions):
    """ "0-1 6-7": sorted positions as runs."""
    runs, start = [], positions[0]
    for a, b in zip(positions, list(positions[1:]) + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return " ".join(runs)


layout = placement.ZIGZAG if kind == "zigzag" else placement.CONTIGUOUS
tokens = placement.positions([(mesh.cp_rank, mesh.cp_size, layout)], s // mesh.cp_size)[1]
split = placement.positions([(mesh.cp_rank, mesh.cp_size, layout), (mesh.tp_rank, mesh.tp_size)],
                            s // (mesh.cp_size * mesh.tp_size))[1]
columns = numpy.arange(B).reshape(mesh.dp_size, m, -1)[mesh.dp_rank]  # this replica's microbatches
parameters = sum(p.size for p in model.parameters())
serial_count = sum(p.size for p in GPT(config).parameters())
# The slice by hand, from ZeRO-1's pieces (parameter i, its elements [a, b), where they sit in the slice):
# one momentum per element.
elements = sum(b - a for pieces in optimizer.pieces for _, a, b, _, _ in pieces)
slice_bytes = elements * len(optimizer.state_buffers) * numpy.dtype(config.dtype).itemsize
each_rank(f"{model.holds()}: {parameters:,} of {serial_count:,} parameters; ZeRO-1 keeps the momentum of "
          f"{elements:,}: {slice_bytes:,} B, 1/{optimizer.group.size} of plain's")
each_rank(f"tokens {spans(list(tokens))} of {s}" + (f" (under SP, LayerNorm and dropout: {spans(list(split))})"
                                                     if sp else "") +
          f"; batch columns {spans(list(columns.ravel()))} of {B}, as microbatches " +
          " | ".join(spans(list(c)) for c in columns))

# ---------------------------------------------------------------------------------------------------
# 3. The step: minitp.training.train_step, the one function for every mesh -- nn.GPT, ParallelGPT or a
# pipeline stage. zero_grad; the forward-backward (here: this replica's columns, m microbatches through
# the stages by 1F1B -- with pp = 1, gradient accumulation -- each stage's blocks attending across the cp
# ring); the synchronisation finished
# (the tied table summed over the two ends, then ZeRO-1's reduce-scatter of every bucket over dp×cp);
# the global norm from the slices (squares summed over dp×cp, tp and the stages) and the clip; the
# optimizer on this rank's slices, and the all-gather of the updated parameters.
# ---------------------------------------------------------------------------------------------------
say(f"\n3. One step: train_step(model, optimizer, ids, targets, mesh, max_norm={MAX_NORM}, "
    f"forward_backward={schedule!r})")
with comm.log_collectives() as log:
    loss, norm = train_step(model, optimizer, ids, targets, mesh, max_norm=MAX_NORM, forward_backward=schedule)
say(f"   loss {loss:.12f}, gradient norm {norm:.12f}" + (f" (clipped to {MAX_NORM})" if norm > MAX_NORM else ""))

# ---------------------------------------------------------------------------------------------------
# 4. What crossed the wire, from the collective log: per group and op, the calls and the bytes of their
# buffers (payload). Every rank of one stage does the same; the stages differ in direction, in their
# buckets' sizes, and in their layers' own collectives (the loss's, on the last). Groups of one rank are
# left out: they send nothing.
# ---------------------------------------------------------------------------------------------------
WHY = {"pp": "the stages hold other layers: each F sends its output, (s/cp, b/m, h) = {shape}, to the next "
             "stage and each B its gradient back; the loss is broadcast from the last stage, the gradient "
             "norm's squares summed over the stages",
       "cp": "each rank holds s/cp tokens, but a query attends to every earlier key: K,V go round the ring "
             "forward, K,V and their gradients dK,dV backward",
       "tp": "each rank holds 1/t of every weight: Megatron's f and g in every layer (under SP all-gathers "
             "and reduce-scatters along s), and the norm's squares of the split weights",
       "embedding": "wte is on the first stage (lookup) and the last (head, wteᵀ): its gradient is the sum "
                    "of the two parts, so both copies take the same step",
       "dp": "the replicas' gradients are parts of one mean: reduce-scattered into ZeRO-1's slices, the "
             "updated slices all-gathered; the norm and the loss summed",
       "dp_cp": "every rank holding these parameters saw other tokens: the gradients reduce-scattered into "
                "ZeRO-1's slices, the updated slices all-gathered; the norm and the loss summed"}
say("\n4. What crossed the wire in that step (calls: payload bytes), and why each group talks")
OPS = ("send", "recv", "sendrecv", "all_to_all", "broadcast", "reduce_scatter", "all_gather", "all_reduce")
counts = collections.defaultdict(lambda: [0, 0])
for record in log:
    if record.group_size > 1:
        counts[record.group, record.op][0] += 1
        counts[record.group, record.op][1] += record.payload_bytes
sends = log.select("send")
table = MPI.COMM_WORLD.gather((mesh.pp_rank, dict(counts)), root=0)
uniform = True
if table is not None:  # rank 0: one column per stage
    stages = {p: [c for stage, c in table if stage == p] for p in range(mesh.pp_size)}
    uniform = all(c == cs[0] for cs in stages.values() for c in cs)  # every rank of a stage the same
    rows = sorted({key for _, c in table for key in c}, key=lambda k: (list(WHY).index(k[0]), OPS.index(k[1])))
    members = {p: " ".join(str(r) for r, (stage, _) in enumerate(table) if stage == p) for p in stages}
    header = f"     {'group':10}{'op':15}" + "".join(f"{f'stage {p}: ranks {members[p]}':>28}" for p in stages)
    say(header if rows else "     nothing: one rank has no one to talk to")
    for group in dict.fromkeys(g for g, _ in rows):
        for _, op in (row for row in rows if row[0] == group):
            cells = [cs[0].get((group, op), (0, 0)) for cs in stages.values()]
            say(f"     {group:10}{op:15}" + "".join(f"{f'{n}: {b:,} B' if n else '-':>28}" for n, b in cells))
        why = WHY[group].format(shape=sends[0].shape if sends else "")
        say(textwrap.fill(why, 110, initial_indent="       why: ", subsequent_indent=" " * 12))
uniform = MPI.COMM_WORLD.bcast(uniform, root=0)

# ---------------------------------------------------------------------------------------------------
# The check: the serial nn.GPT, the same config (so the same initial weights and the same dropout masks:
# each mask bit is drawn from its global (token, column) position, whichever rank draws it), one
# train_step on the whole batch at once, mesh=None. The pipeline's loss is the mean of the m microbatch
# means over the dp×cp ranks' tokens; its gradient the same sums in another order. Each rank gathers its
# stage's parameters over tp to the serial names and shapes and compares them; together the stages must
# cover every parameter of the serial model.
# ---------------------------------------------------------------------------------------------------
say("\nThe check: the serial GPT's step on the whole batch, the same config and dropout")
serial = GPT(config)
serial_loss, serial_norm = train_step(serial, SGD(serial.named_parameters(), lr=LR, momentum=MOMENTUM), ids,
                                      targets, max_norm=MAX_NORM)
expected, updated = serial.state_dict(), gather_serial_state(model, mesh.tp)
error = max(max_error(updated[name], expected[name]) for name in updated)
each_rank(f"max |step - serial| over the {len(updated)} updated parameters of its stage: {error:.1e}")
say(f"   loss {loss:.12f} (serial {serial_loss:.12f}), norm {norm:.12f} (serial {serial_norm:.12f})")
worst = max(error, max_error(loss, serial_loss), max_error(norm, serial_norm))
worst = MPI.COMM_WORLD.allreduce(worst, op=MPI.MAX)
covered = set().union(*MPI.COMM_WORLD.allgather(set(updated))) == set(expected)
sliced = optimizer.state_bytes() == slice_bytes  # ZeRO-1 kept exactly the slice counted in part 2
claims = {"every parameter on some stage": covered, "ZeRO-1's state = the slice counted by hand": sliced,
          "every rank of a stage sent the same": uniform}
failed = [claim for claim, holds in claims.items() if not MPI.COMM_WORLD.allreduce(holds, op=MPI.LAND)]
verdict(worst <= 1e-12 and not failed,
        f"(dp, pp, cp, tp) = {grid} step == serial step (max error {worst:.1e}, loss, norm and every updated "
        f"parameter) on {ranks(world)}",
        failure=f"max error {worst:.1e} (must be <= 1e-12); claims that do not hold: {failed}")
