"""Tensor parallelism's layers are their serial twins: ColumnParallelLinear, RowParallelLinear, Megatron's
ParallelMLP, the notebook's SyncPointMLP and head-parallel ParallelAttention (Shoeybi et al. 2019).

For each, on 1 to 4 ranks in float64:
- the output and the gradients of the input and of every parameter (gathered) equal the serial
  module's to 1e-12 (``compare``);
- a finite-difference gradcheck of the sharded module itself, collectives included, passes;
- the collective log is the paper's: Megatron's MLP and attention move one s×b×h all-reduce forward
  (f̄) and one backward (f); the sync-point MLP pays for its sync point;
- sizes that do not divide by the tensor-parallel size raise a ValueError on every rank, before any
  collective.

Sizes depend on t (the world size) so that they divide: heads = 2t, ffn = 6t, ... with odd sizes
(hidden 5, seq 3), and batch 1 with seq 1.
"""
import numpy
import pytest
from pytest_mpi import parallel_assert

from minitp import rng
from minitp.autograd import Tensor
from minitp.nn.attention import MultiHeadAttention
from minitp.nn.layers import Linear
from minitp.nn.mlp import MLP
from minitp.parallel import (ColumnParallelLinear, ParallelAttention, ParallelMLP, RowParallelLinear, SyncPointMLP,
                             mappings)
from parallel_helpers import (GRADCHECK, TIGHT, block, compare, randomize, replicated, run_logged, sharded_gradcheck,
                              summary, tp_mesh, value_error, whole, worst)

F64 = numpy.float64
SHAPES = [(3, 2), (1, 1)]  # (seq, batch): odd, and one token of batch 1
ALL_RANKS = [1, 2, 3, 4]


def dropped(dropout, shape):
    """How many of ``shape``'s elements ``dropout`` (a Dropout module) drops on its first call: a test
    of mask consistency means something only if the mask drops something."""
    return int((~rng.keep_mask(shape, dropout.p, dropout.seed, 0, xp=numpy)).sum())


def columns(group):
    return lambda array: block(array, group, -1)


# -- the sharded layers equal the serial ones --------------------------------------------------------

@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("seq, batch", SHAPES)
@pytest.mark.parametrize("gather_output", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_column_parallel_linear_matches_serial(seq, batch, gather_output, bias):
    """A split by output columns: rank r computes X A_r, its columns of Y (all of Y after the gather)."""
    tp = tp_mesh().tp
    features_in, features_out = 5, 3 * tp.size
    serial = randomize(Linear(features_in, features_out, bias=bias, dtype=F64))
    sharded = ColumnParallelLinear(features_in, features_out, bias=bias, gather_output=gather_output, dtype=F64, group=tp)
    errors = compare(serial, sharded, replicated((seq, batch, features_in), 1),
                     replicated((seq, batch, features_out), 2),
                     output_block=whole if gather_output else columns(tp))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("seq, batch", SHAPES)
@pytest.mark.parametrize("input_is_parallel", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_row_parallel_linear_matches_serial(seq, batch, input_is_parallel, bias):
    """A split by input rows: rank r's X_r A_r is a partial sum of Y; f̄ adds them, then the bias once."""
    tp = tp_mesh().tp
    features_in, features_out = 3 * tp.size, 5
    serial = randomize(Linear(features_in, features_out, bias=bias, dtype=F64))
    sharded = RowParallelLinear(features_in, features_out, bias=bias, input_is_parallel=input_is_parallel,
                                dtype=F64, group=tp)
    errors = compare(serial, sharded, replicated((seq, batch, features_in), 1),
                     replicated((seq, batch, features_out), 2),
                     input_block=columns(tp) if input_is_parallel else whole)
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("seq, batch", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_parallel_mlp_matches_serial(seq, batch, dropout):
    tp = tp_mesh().tp
    hidden, ffn = 5, 6 * tp.size
    serial = randomize(MLP(hidden, ffn, dropout=dropout, seed=4, dtype=F64))
    sharded = ParallelMLP(hidden, ffn, dropout=dropout, seed=4, dtype=F64, group=tp)
    errors = compare(serial, sharded, replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))
    parallel_assert(dropout == 0 or seq == 1 or dropped(serial.dropout, (seq, batch, hidden)) > 0,
                    "the residual dropout drops nothing: the test would not see an inconsistent mask")


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("seq, batch", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sync_point_mlp_matches_serial(seq, batch, dropout):
    tp = tp_mesh().tp
    hidden, ffn = 3 * tp.size, 6 * tp.size  # the first GEMM is split along hidden, its contraction dimension
    serial = randomize(MLP(hidden, ffn, dropout=dropout, seed=4, dtype=F64))
    sharded = SyncPointMLP(hidden, ffn, dropout=dropout, seed=4, dtype=F64, group=tp)
    errors = compare(serial, sharded, replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("seq, batch", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_parallel_attention_matches_serial(seq, batch, causal, dropout):
    """Whole heads per rank (2 of 2t), head size 3; the attention-probability dropout draws the rank's
    heads' slice of the serial (b, a, s, s) mask, the residual dropout the whole (replicated) mask."""
    tp = tp_mesh().tp
    heads = 2 * tp.size
    hidden = 3 * heads
    options = dict(causal=causal, attention_dropout=dropout, dropout=dropout, seed=6, dtype=F64)
    serial = randomize(MultiHeadAttention(hidden, heads, **options))
    sharded = ParallelAttention(hidden, heads, group=tp, **options)
    errors = compare(serial, sharded, replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))
    parallel_assert(dropout == 0 or seq == 1
                    or dropped(serial.attention_dropout, (batch, heads, seq, seq)) > 0,
                    "the attention dropout drops nothing: the test would not see an inconsistent mask")


# -- finite differences through the sharded modules, collectives included ----------------------------
# Tiny sizes: every checked entry costs two forwards with their collectives, on every rank. One token per
# rank, so a replicated input or output can be carried as a sequence shard (see sharded_gradcheck).

def check(module, x, group, **replication):
    result, expected_entries = sharded_gradcheck(module, x, group, **replication)
    parallel_assert(result.max_error <= GRADCHECK, str(result))
    parallel_assert(result.entries == expected_entries, f"{result}, expected {expected_entries} entries")


def token_shard(group, hidden, batch=1, seed=1):
    """This rank's one token of a (t, batch, hidden) input, as a leaf that requires grad."""
    return Tensor(block(replicated((group.size, batch, hidden), seed), group, 0), requires_grad=True)


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear_gradcheck(gather_output):
    tp = tp_mesh().tp
    layer = ColumnParallelLinear(2, 2 * tp.size, gather_output=gather_output, dtype=F64, seed=1, group=tp)
    check(layer, token_shard(tp, 2), tp, replicated_input=True, replicated_output=gather_output)


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear_gradcheck(input_is_parallel):
    tp = tp_mesh().tp
    layer = RowParallelLinear(2 * tp.size, 2, input_is_parallel=input_is_parallel, dtype=F64, seed=1, group=tp)
    if input_is_parallel:  # rank r's columns of X: per-rank numbers, perturbed as they are
        x = Tensor(block(replicated((tp.size, 1, 2 * tp.size), 1), tp, -1), requires_grad=True)
    else:
        x = token_shard(tp, 2 * tp.size)
    check(layer, x, tp, replicated_input=not input_is_parallel, replicated_output=True)


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_parallel_mlp_gradcheck():
    tp = tp_mesh().tp
    mlp = ParallelMLP(2, 2 * tp.size, dropout=0.1, seed=2, dtype=F64, group=tp)
    check(mlp, token_shard(tp, 2, batch=2), tp, replicated_input=True, replicated_output=True)


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_sync_point_mlp_gradcheck():
    tp = tp_mesh().tp
    mlp = SyncPointMLP(tp.size, 2 * tp.size, dropout=0.1, seed=2, dtype=F64, group=tp)
    check(mlp, token_shard(tp, tp.size), tp, replicated_input=True, replicated_output=True)


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("causal", [True, False])
def test_parallel_attention_gradcheck(causal):
    tp = tp_mesh().tp
    heads = tp.size  # one head of size 1 per rank: the fused qkv weight (h, 3h) dominates the cost
    attention = ParallelAttention(heads, heads, causal=causal, attention_dropout=0.1, dropout=0.1, seed=3,
                                  dtype=F64, group=tp)
    check(attention, token_shard(tp, heads), tp, replicated_input=True, replicated_output=True)


# -- what crosses the wire ---------------------------------------------------------------------------

def ring_all_reduce(t, shape):
    """Bytes one rank sends in a ring all-reduce of a float64 array: 2(t-1)/t · S."""
    return 2 * (t - 1) * 8 * int(numpy.prod(shape)) / t


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("layer", ["mlp", "attention"])
def test_megatron_mlp_and_attention_do_one_all_reduce_each_way(layer):
    """Column-parallel then row-parallel: f̄ sums the row layer's partial outputs (forward), f sums the
    column layer's partial input gradients (backward). One s×b×h all-reduce each way, nothing else."""
    tp = tp_mesh().tp
    t = tp.size
    seq, batch, hidden = 3, 2, 6 * t
    module = (ParallelMLP(hidden, 6 * t, dropout=0.1, dtype=F64, group=tp) if layer == "mlp"
              else ParallelAttention(hidden, 2 * t, dropout=0.1, attention_dropout=0.1, dtype=F64, group=tp))
    forward, backward = run_logged(module, replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2))
    sbh = (seq, batch, hidden)
    parallel_assert([(r.op, r.shape, r.tag.endswith("f-bar forward")) for r in forward]
                    == [("all_reduce", sbh, True)], f"forward: {summary(forward)}")
    parallel_assert([(r.op, r.shape, r.tag.endswith("f backward")) for r in backward]
                    == [("all_reduce", sbh, True)], f"backward: {summary(backward)}")
    parallel_assert(all(r.group == "tp" and r.ring_bytes == ring_all_reduce(t, sbh) for r in forward + backward))


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_sync_point_mlp_communicates_at_its_sync_point():
    """Forward: the first GEMM's partial sums are all-reduced before GeLU (s×b×ffn), and the second's
    after it (s×b×h). Backward: the two splits of replicated tensors become all-gathers of their
    gradients, dY (s×b×ffn) then dX (s×b×h). Megatron's MLP moves s×b×h each way instead."""
    tp = tp_mesh().tp
    t = tp.size
    seq, batch, hidden, ffn = 3, 2, 2 * t, 8 * t
    mlp = SyncPointMLP(hidden, ffn, dropout=0.1, dtype=F64, group=tp)
    forward, backward = run_logged(mlp, replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2))
    parallel_assert([(r.op, r.shape, r.tag.endswith("f-bar forward")) for r in forward]
                    == [("all_reduce", (seq, batch, ffn), True), ("all_reduce", (seq, batch, hidden), True)],
                    f"forward: {summary(forward)}")
    parallel_assert([(r.op, r.shape, r.tag.endswith("scatter(last) backward")) for r in backward]
                    == [("all_gather", (seq, batch, ffn), True), ("all_gather", (seq, batch, hidden), True)],
                    f"backward: {summary(backward)}")
    megatron_bytes = 2 * ring_all_reduce(t, (seq, batch, hidden))  # one s×b×h all-reduce each way
    sync_point_bytes = sum(r.ring_bytes for r in forward + backward)
    # all-reduces 2(t-1)/t·(ffn + h)sb, all-gathers (t-1)/t·(ffn + h)sb: with ffn = 4h, 3.75 times Megatron's
    parallel_assert(sync_point_bytes == megatron_bytes * 3 * (ffn + hidden) / (4 * hidden),
                    f"{sync_point_bytes} vs Megatron's {megatron_bytes}")


# -- sizes that cannot be split fail on every rank, before any communication --------------------------

@pytest.mark.parallel(nprocs=[2, 3, 4])
@pytest.mark.parametrize("what, build", [
    ("heads", lambda tp, t: ParallelAttention(2 * (t + 1), t + 1, dtype=F64, group=tp)),
    ("ffn_hidden", lambda tp, t: ParallelMLP(4, t + 1, dtype=F64, group=tp)),
    ("out_features", lambda tp, t: ColumnParallelLinear(4, t + 1, dtype=F64, group=tp)),
    ("in_features", lambda tp, t: RowParallelLinear(t + 1, 4, dtype=F64, group=tp)),
    ("hidden", lambda tp, t: SyncPointMLP(t + 1, 2 * t, dtype=F64, group=tp)),  # hidden, split by fc1's rows
    ("ffn_hidden", lambda tp, t: SyncPointMLP(2 * t, t + 1, dtype=F64, group=tp)),  # ffn, split by fc2's rows
], ids=["heads", "ffn", "column-out", "row-in", "sync-point-hidden", "sync-point-ffn"])
def test_sizes_not_divisible_raise_on_every_rank_before_any_collective(what, build):
    tp = tp_mesh().tp
    t = tp.size
    message, collectives = value_error(lambda: build(tp, t))
    parallel_assert(message is not None, "this rank built the module without a ValueError")
    parallel_assert(message is None or (what in message and f"divisible by {t}" in message), str(message))
    parallel_assert(collectives == 0, f"{collectives} collectives ran before the error")


# -- the proof can fail ------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_an_f_without_its_all_reduce_breaks_the_mlp_comparison(monkeypatch):
    """Break Megatron's f -- identity backward instead of the all-reduce -- and the MLP proof goes red:
    each rank's input gradient is then only its own columns' contribution, X's gradient through A_r.
    The weights' gradients stay right (they never pass through f), which the errors show as well."""
    monkeypatch.setattr(mappings.CopyToTensorParallelRegion, "backward", lambda self, grad: grad)
    tp = tp_mesh().tp
    hidden, ffn = 5, 6 * tp.size
    serial = randomize(MLP(hidden, ffn, dtype=F64))
    errors = compare(serial, ParallelMLP(hidden, ffn, dtype=F64, group=tp), replicated((3, 2, hidden), 1),
                     replicated((3, 2, hidden), 2))
    parallel_assert(errors["input grad"] > 1e-3, f"the broken f went unnoticed: {worst(errors)}")
    parallel_assert(all(error <= TIGHT for name, error in errors.items() if name != "input grad"), worst(errors))
