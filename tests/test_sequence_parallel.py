"""Sequence parallelism (Korthikanti et al. 2022) is exact and costs what the paper says.

On 1 to 4 ranks in float64:
- sequence-parallel LayerNorm and dropout, the sequence-parallel Column/Row linears and the whole
  ``ParallelTransformerBlock`` with sequence parallelism on and off, dropout on and off, equal their
  serial twins to 1e-12: output, input gradient and every parameter gradient (under SP, rank r's
  sequence block of the serial tensors); a finite-difference gradcheck of the sharded block passes;
- the classic bug -- a sequence-parallel LayerNorm whose weight gradients are not summed over the
  ranks -- turns the block's proof red;
- communication, from the collective log, per layer and per rank: TP+SP forward sends exactly TP's
  ring bytes; backward sends TP's plus two named extras;
- activation memory, from the engine's saved-bytes accounting: TP+SP keeps the serial block's bytes
  divided by t, TP keeps the replicated part whole -- the paper's formulas, exactly, in bytes;
- a sequence that does not divide by t raises a ValueError on every rank, before any collective.
"""
import numpy
import pytest
from pytest_mpi import parallel_assert

from minitp import track_saved
from minitp.autograd import Tensor
from minitp.functional import layer_norm
from minitp.nn.layers import Dropout, LayerNorm, Linear
from minitp.nn.transformer import TransformerBlock
from minitp.parallel import (ColumnParallelLinear, ParallelTransformerBlock, RowParallelLinear, SequenceParallelDropout,
                             SequenceParallelLayerNorm, mappings)
from minitp.parallel.tensor.shard import split_axis
from minitp.testing import directional_gradcheck
from parallel_helpers import (GRADCHECK, TIGHT, block, compare, randomize, replicated, reset_dropout, run_logged,
                              sequence_block, sharded_gradcheck, summary, tp_mesh, value_error, worst)

F64 = numpy.float64
ALL_RANKS = [1, 2, 3, 4]
TOKENS = [(2, 1), (1, 3)]  # (tokens per rank, batch): the sequence is t times the first


def sequence_parallel_blocks(group):
    return dict(input_block=lambda a: sequence_block(a, group), output_block=lambda a: sequence_block(a, group))


# -- the layers that only sequence parallelism has ---------------------------------------------------

@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("tokens, batch", TOKENS)
def test_sequence_parallel_layer_norm_matches_serial(tokens, batch):
    """Each rank normalises its own tokens; weight and bias gradients are summed over the ranks (f)."""
    tp = tp_mesh().tp
    hidden, seq = 5, tokens * tp.size
    serial = randomize(LayerNorm(hidden, dtype=F64))
    errors = compare(serial, SequenceParallelLayerNorm(hidden, dtype=F64, group=tp), replicated((seq, batch, hidden), 1),
                     replicated((seq, batch, hidden), 2), **sequence_parallel_blocks(tp))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("tokens, batch", TOKENS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_sequence_parallel_dropout_draws_the_ranks_block_of_the_serial_mask(tokens, batch, p):
    tp = tp_mesh().tp
    seq, hidden = tokens * tp.size, 7
    serial, sharded = Dropout(p, seed=11), SequenceParallelDropout(p, seed=11, group=tp)
    x, upstream = replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2)
    errors = compare(serial, sharded, x, upstream, **sequence_parallel_blocks(tp))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))
    serial.counter = 0  # the same call again: how many elements it drops, so the test means something
    dropped = int((serial(Tensor(x)).data == 0).sum())
    parallel_assert(dropped > 0, "the serial mask drops nothing: an inconsistent mask would go unseen")


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("tokens, batch", TOKENS)
def test_sequence_parallel_column_linear_gathers_the_sequence(tokens, batch):
    """g then X A_r: input rank r's tokens, output all tokens of rank r's columns. Backward keeps only
    the shard of X and all-gathers it again for dA_r."""
    tp = tp_mesh().tp
    seq, features_in, features_out = tokens * tp.size, 5, 2 * tp.size
    serial = randomize(Linear(features_in, features_out, dtype=F64))
    sharded = ColumnParallelLinear(features_in, features_out, sequence_parallel=True, dtype=F64, group=tp)
    errors = compare(serial, sharded, replicated((seq, batch, features_in), 1),
                     replicated((seq, batch, features_out), 2), input_block=lambda a: sequence_block(a, tp),
                     output_block=lambda a: block(a, tp, -1))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("tokens, batch", TOKENS)
def test_sequence_parallel_row_linear_reduce_scatters_the_sequence(tokens, batch):
    """X_r A_r then ḡ: input rank r's columns of all tokens, output rank r's tokens of the sum; the
    replicated bias meets only rank r's tokens, so its gradient is summed over the ranks (f)."""
    tp = tp_mesh().tp
    seq, features_in, features_out = tokens * tp.size, 2 * tp.size, 5
    serial = randomize(Linear(features_in, features_out, dtype=F64))
    sharded = RowParallelLinear(features_in, features_out, sequence_parallel=True, dtype=F64, group=tp)
    errors = compare(serial, sharded, replicated((seq, batch, features_in), 1),
                     replicated((seq, batch, features_out), 2), input_block=lambda a: block(a, tp, -1),
                     output_block=lambda a: sequence_block(a, tp))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


# -- the transformer block ---------------------------------------------------------------------------

def blocks(tp, sequence_parallel, dropout=0.0, causal=True, heads_per_rank=1, head_dim=3, ffn_hidden=None, seed=7):
    """(serial TransformerBlock with random weights, ParallelTransformerBlock) of the same configuration."""
    heads = heads_per_rank * tp.size
    hidden = heads * head_dim
    options = dict(ffn_hidden=ffn_hidden, causal=causal, dropout=dropout, attention_dropout=dropout, seed=seed,
                   dtype=F64)
    return (randomize(TransformerBlock(hidden, heads, **options)),
            ParallelTransformerBlock(hidden, heads, sequence_parallel=sequence_parallel, **options, group=tp))


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("tokens, batch", TOKENS)
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("causal", [True, False])
def test_block_matches_serial(tokens, batch, sequence_parallel, dropout, causal):
    """TP: input and output replicated, (s, b, h) on every rank. TP+SP: rank r holds tokens
    [r·s/t, (r+1)·s/t) of the input and of the output, and the dropouts outside attention and MLP draw
    that block of the serial masks."""
    tp = tp_mesh().tp
    serial, sharded = blocks(tp, sequence_parallel, dropout, causal, heads_per_rank=2)
    seq, hidden = tokens * tp.size, serial.ln1.hidden
    errors = compare(serial, sharded, replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2),
                     **(sequence_parallel_blocks(tp) if sequence_parallel else {}))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


@pytest.mark.parallel(nprocs=ALL_RANKS)
@pytest.mark.parametrize("seq, batch", [(3, 2), (1, 1)])
def test_tensor_parallel_block_matches_serial_on_odd_sequences(seq, batch):
    """Without SP the sequence need not divide by t: 3 tokens, or 1, whatever the rank count."""
    serial, sharded = blocks(tp_mesh().tp, False, dropout=0.1)
    hidden = serial.ln1.hidden
    errors = compare(serial, sharded, replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2))
    parallel_assert(max(errors.values()) <= TIGHT, worst(errors))


# the smallest hidden size that t heads divide and whose LayerNorm is not degenerate (with h <= 2 the
# normalised token is a constant up to sign, so its gradient vanishes and the check would prove little)
GRADCHECK_HIDDEN = {1: 3, 2: 4, 3: 3, 4: 4}


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_sequence_parallel_block_gradcheck():
    """Finite differences through the whole TP+SP block, collectives included: one token per rank, t
    heads, ffn 2t, dropout on (the masks are redrawn identically each time). Every checked number lives
    on one rank: the input's tokens and the split weights. (The TP-only block's parts are gradchecked in
    test_parallel_layers.py; every entry costs two forwards on every rank, so this stays tiny.)"""
    tp = tp_mesh().tp
    t = tp.size
    hidden = GRADCHECK_HIDDEN.get(t, t)
    layer = ParallelTransformerBlock(hidden, t, ffn_hidden=2 * t, dropout=0.1, attention_dropout=0.1, seed=7,
                                     dtype=F64, sequence_parallel=True, group=tp)
    randomize(layer.ln1, seed=1)  # replicated, the same on every rank: not ones and zeros
    randomize(layer.ln2, seed=2)
    x = Tensor(sequence_block(replicated((t, 1, hidden), 1), tp), requires_grad=True)
    result, expected_entries = sharded_gradcheck(layer, x, tp)
    parallel_assert(result.max_error <= GRADCHECK, str(result))
    parallel_assert(result.entries == expected_entries, f"{result}, expected {expected_entries} entries")


# -- the proof catches the classic sequence-parallel bug ---------------------------------------------

LAYER_NORM_PARAMETERS = ["ln1.weight grad", "ln1.bias grad", "ln2.weight grad", "ln2.bias grad"]


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_a_layer_norm_without_the_gradient_sum_breaks_the_block_comparison(monkeypatch):
    """Use the plain weight and bias in SequenceParallelLayerNorm, without f: each rank's LayerNorm
    gradients then cover only its s/t tokens. The block's proof must go red on exactly those four
    gradients (the rest of the block is unaffected) -- so the suite proves the sum matters."""
    monkeypatch.setattr(SequenceParallelLayerNorm, "forward",
                        lambda self, x: layer_norm(x, self.weight, self.bias, eps=self.eps))
    tp = tp_mesh().tp
    serial, sharded = blocks(tp, True)
    seq, hidden = 2 * tp.size, serial.ln1.hidden
    errors = compare(serial, sharded, replicated((seq, 1, hidden), 1), replicated((seq, 1, hidden), 2),
                     **sequence_parallel_blocks(tp))
    parallel_assert(all(errors[name] > 1e-3 for name in LAYER_NORM_PARAMETERS),
                    f"the missing sum went unnoticed: {worst(errors)}")
    parallel_assert(all(error <= TIGHT for name, error in errors.items() if name not in LAYER_NORM_PARAMETERS),
                    worst(errors))


# -- communication: TP+SP sends what TP sends --------------------------------------------------------

def ring_bytes(records):
    return sum(r.ring_bytes for r in records)


def only(records, op, tag_end):
    return [r for r in records if r.op == op and r.tag.endswith(tag_end)]


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_tensor_parallel_block_does_two_all_reduces_each_way():
    """Megatron: f̄ after attention and after the MLP forward; f before each backward. s×b×h each."""
    tp = tp_mesh().tp
    _, sharded = blocks(tp, False, dropout=0.1)
    sbh = (3, 2, sharded.ln1.hidden)
    forward, backward = run_logged(sharded, replicated(sbh, 1), replicated(sbh, 2))
    parallel_assert([(r.op, r.shape) for r in only(forward, "all_reduce", "f-bar forward")] == [("all_reduce", sbh)] * 2
                    and len(forward) == 2, f"forward: {summary(forward)}")
    parallel_assert([(r.op, r.shape) for r in only(backward, "all_reduce", "f backward")] == [("all_reduce", sbh)] * 2
                    and len(backward) == 2, f"backward: {summary(backward)}")


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_sequence_parallel_sends_the_ring_bytes_of_tensor_parallel():
    """Per layer and per rank, from the collective log.

    Forward: each of TP's two all-reduces (2(t-1)/t·S) becomes an all-gather g + a reduce-scatter ḡ
    ((t-1)/t·S each): the same bytes. Backward: TP's two f all-reduces become ḡ's all-gathers + g's
    reduce-scatters (the same bytes again), plus
      (a) the all-gathers that re-gather the sharded inputs of the column-parallel layers (qkv, fc1)
          for their weight gradients: the price of keeping those inputs sharded, which the paper's
          sbh(34/t) assumes;
      (b) the all-reduces of the replicated parameters' gradients, h elements each: the LayerNorms'
          weights and biases and the row-parallel biases, each of which saw only s/t tokens.
    """
    tp = tp_mesh().tp
    t = tp.size
    _, tensor_parallel = blocks(tp, False, dropout=0.1)
    _, sequence_parallel = blocks(tp, True, dropout=0.1)
    seq, batch, hidden = 2 * t, 3, tensor_parallel.ln1.hidden
    S = 8 * seq * batch * hidden  # one float64 s×b×h tensor, in bytes
    x, upstream = replicated((seq, batch, hidden), 1), replicated((seq, batch, hidden), 2)
    tp_forward, tp_backward = run_logged(tensor_parallel, x, upstream)
    sp_forward, sp_backward = run_logged(sequence_parallel, sequence_block(x, tp), sequence_block(upstream, tp))

    # forward: g (all-gather) before qkv and fc1, ḡ (reduce-scatter) after proj and fc2, nothing else
    g_forward = only(sp_forward, "all_gather", ": g forward")
    g_bar_forward = only(sp_forward, "reduce_scatter", ": g-bar forward")
    parallel_assert(len(g_forward) == len(g_bar_forward) == 2 and len(sp_forward) == 4, summary(sp_forward))
    parallel_assert(all(r.shape == (seq, batch, hidden) for r in sp_forward), summary(sp_forward))
    parallel_assert(ring_bytes(tp_forward) == 2 * 2 * (t - 1) * S / t, summary(tp_forward))
    parallel_assert(ring_bytes(g_forward) + ring_bytes(g_bar_forward) == ring_bytes(tp_forward),
                    f"TP+SP forward {ring_bytes(sp_forward)} B vs TP {ring_bytes(tp_forward)} B")

    # backward: the conjugates, then the two extras, each collective named by its tag
    g_backward = only(sp_backward, "reduce_scatter", ": g backward")
    g_bar_backward = only(sp_backward, "all_gather", ": g-bar backward")
    re_gathers = [r for r in sp_backward if r.op == "all_gather" and "re-gather" in r.tag]
    replicated_grads = only(sp_backward, "all_reduce", "f backward")
    parallel_assert(sorted(r.tag for r in re_gathers)
                    == ["attention qkv: g backward: re-gather X for dA", "mlp fc1: g backward: re-gather X for dA"],
                    summary(re_gathers))
    parallel_assert(sorted(r.tag for r in replicated_grads)
                    == sorted(["ln1: weight: f backward", "ln1: bias: f backward", "ln2: weight: f backward",
                               "ln2: bias: f backward", "attention proj: bias: f backward",
                               "mlp fc2: bias: f backward"]), summary(replicated_grads))
    parallel_assert(all(r.shape == (hidden,) for r in replicated_grads), summary(replicated_grads))
    parallel_assert(len(g_backward) == len(g_bar_backward) == 2
                    and len(sp_backward) == 4 + len(re_gathers) + len(replicated_grads), summary(sp_backward))
    parallel_assert(ring_bytes(tp_backward) == 2 * 2 * (t - 1) * S / t, summary(tp_backward))
    conjugates = ring_bytes(g_backward) + ring_bytes(g_bar_backward)
    parallel_assert(conjugates == ring_bytes(tp_backward), f"{conjugates} B vs TP {ring_bytes(tp_backward)} B")
    parallel_assert(ring_bytes(re_gathers) == 2 * (t - 1) * S / t, summary(re_gathers))
    parallel_assert(ring_bytes(replicated_grads) == 6 * 2 * (t - 1) * 8 * hidden / t, summary(replicated_grads))
    parallel_assert(ring_bytes(sp_backward)
                    == ring_bytes(tp_backward) + ring_bytes(re_gathers) + ring_bytes(replicated_grads),
                    f"TP+SP backward {ring_bytes(sp_backward)} B vs TP {ring_bytes(tp_backward)} B")


# -- activation memory: what each rank keeps for backward -------------------------------------------

ACTIVATION, MASK = 8, 1  # bytes per float64 activation, per dropout-mask element (bool)


def saved_bytes(module, x):
    with track_saved() as saved:
        module(Tensor(x, requires_grad=True))
    return saved


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_activation_memory_is_the_papers():
    """One block forward with dropout on (so the masks are kept), ffn = 4h, in bytes.

    The paper (Korthikanti et al. 2022, section 4), with e bytes per activation and m per mask element:
        none    e(16sbh + 2as²b) + m(2sbh + as²b)            = sbh(34 + 5as/h) at e = 2, m = 1
        TP      e(4sbh + 12sbh/t + 2as²b/t) + m(2sbh + as²b/t) = sbh(10 + 24/t + 5as/(ht))
        TP+SP   none / t                                       = sbh(34/t + 5as/(ht))
    where the activations are: LayerNorm inputs 2·sbh (we keep x̂, the same size); attention's qkv input
    sbh, Q and K 2sbh, V sbh, softmax output as²b, dropped probabilities as²b, proj input sbh; the
    MLP's fc1 input sbh, GeLU input 4sbh, fc2 input 4sbh; masks: attention as²b, two residual sbh.
    TP divides everything between the column-parallel input and the row-parallel output by t and
    keeps the rest -- the LayerNorms, the qkv and fc1 inputs and the residual masks -- whole on every
    rank; TP+SP divides that rest along the sequence too.

    Terms the paper ignores, which the engine counts:
    - LayerNorm's per-token 1/std, sb numbers per LayerNorm (divided by t under SP, like its tokens);
    - attention's 1/sqrt(d) scale, a 0-d array kept by the multiplication that applies it: e bytes,
      on every rank whatever t.
    """
    tp = tp_mesh().tp
    t = tp.size
    seq, batch, heads = 2 * t, 3, 2 * t
    head_dim = 2
    hidden = heads * head_dim
    s, b, h, a = seq, batch, hidden, heads
    sbh, as2b, e, m = s * b * h, a * s * s * b, ACTIVATION, MASK
    layer_norm_statistics, scale = 2 * s * b * e, e

    serial, tensor_parallel = blocks(tp, False, dropout=0.1, heads_per_rank=2, head_dim=head_dim)
    _, sequence_parallel = blocks(tp, True, dropout=0.1, heads_per_rank=2, head_dim=head_dim)
    parallel_assert(serial.mlp.ffn_hidden == 4 * hidden)
    x = replicated((seq, batch, hidden), 1)
    measured = {"none": saved_bytes(serial, x), "TP": saved_bytes(tensor_parallel, x),
                "TP+SP": saved_bytes(sequence_parallel, sequence_block(x, tensor_parallel.group))}

    none = e * (16 * sbh + 2 * as2b) + m * (2 * sbh + as2b)
    expected = {
        "none": none + layer_norm_statistics + scale,
        "TP": e * (4 * sbh + 12 * sbh // t + 2 * as2b // t) + m * (2 * sbh + as2b // t) + layer_norm_statistics
        + scale,
        "TP+SP": none // t + layer_norm_statistics // t + scale,
    }
    masks = {"none": m * (2 * sbh + as2b), "TP": m * (2 * sbh + as2b // t), "TP+SP": m * (2 * sbh + as2b) // t}
    for name in expected:
        parallel_assert(measured[name].total == expected[name],
                        f"{name}: measured {measured[name].total} B, expected {expected[name]} B; "
                        f"by op {measured[name].by_op}")
        parallel_assert(measured[name].by_op.get("Dropout") == masks[name], f"{name} masks: {measured[name].by_op}")
    # the paper's claim, in the engine's numbers: SP divides the serial layer by t (but for the scale) ...
    parallel_assert(measured["TP+SP"].total - scale == (measured["none"].total - scale) / t)
    # ... while TP keeps the replicated part, 4sbh activations and 2sbh mask bytes, on every rank
    replicated_part = e * 4 * sbh + m * 2 * sbh + layer_norm_statistics
    parallel_assert(measured["TP"].total - measured["TP+SP"].total == replicated_part - replicated_part // t)


# -- sizes that cannot be split -----------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[2, 3, 4])
@pytest.mark.parametrize("enter", ["scatter", "reduce-scatter"])
def test_a_sequence_not_divisible_raises_on_every_rank_before_any_collective(enter):
    """Entering the sequence-parallel region from a replicated tensor (scatter) or from partial sums
    (ḡ) with s = t + 1 tokens."""
    tp = tp_mesh().tp
    x = Tensor(replicated((tp.size + 1, 2, 3), 1), requires_grad=True)
    operator = (mappings.scatter_to_sequence_parallel_region if enter == "scatter"
                else mappings.reduce_scatter_to_sequence_parallel_region)
    message, collectives = value_error(lambda: operator(x, tp))
    parallel_assert(message is not None, "this rank cut the sequence without a ValueError")
    parallel_assert(message is None or f"not divisible by {tp.size}" in message, str(message))
    parallel_assert(collectives == 0, f"{collectives} collectives ran before the error")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_a_block_whose_heads_do_not_divide_raises_on_every_rank():
    tp = tp_mesh().tp
    t = tp.size
    message, collectives = value_error(
        lambda: ParallelTransformerBlock(2 * (t + 1), t + 1, sequence_parallel=True, dtype=F64, group=tp))
    parallel_assert(message is not None and "heads" in message and collectives == 0, str(message))


@pytest.mark.parallel(nprocs=ALL_RANKS)
def test_directional_gradcheck_of_the_block_moves_the_replicated_weights_too():
    """Finite differences through the whole TP+SP block along random directions that move every input at
    once: the rank's tokens and weight blocks (a direction of their own on each rank), and the replicated
    LayerNorm weights and row-parallel biases (one direction shared by every rank, so their copies move
    together) -- whose gradients are right only if f sums them over the ranks."""
    tp = tp_mesh().tp
    _, layer = blocks(tp, True, dropout=0.1, heads_per_rank=1, head_dim=2, ffn_hidden=2 * tp.size)
    randomize(layer)  # LayerNorm's 1 and 0 would hide a forward that skipped it; every rank draws the same
    parameters = [p for _, p in layer.named_parameters()]
    x = Tensor(sequence_block(replicated((2 * tp.size, 2, layer.ln1.hidden), 1), tp), requires_grad=True)

    def run(tokens, *weights):  # the weights are the layer's own: the check moves them in place
        reset_dropout(layer)
        return layer(tokens)

    replicated_inputs = [1 + i for i, p in enumerate(parameters) if split_axis(p) is None]
    result = directional_gradcheck(run, [x, *parameters], comm=tp.comm, replicated_inputs=replicated_inputs,
                                   directions=3)
    parallel_assert(result.max_error <= GRADCHECK, str(result))
    parallel_assert(len(replicated_inputs) == 6, f"ln1, ln2 weight and bias, proj and fc2 bias: {replicated_inputs}")
