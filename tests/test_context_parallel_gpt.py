"""ParallelGPT with context parallelism against the serial nn.GPT, in float64 with dropout on (residual,
embedding and attention dropout): ring (contiguous), zigzag and Ulysses, cp = 1, 2, 4, with tp = 2 and
sequence parallelism and dp where the ranks allow (up to 8 ranks). Compared within 1e-12: each rank's
logits (its tokens' rows, its vocabulary columns), the loss averaged over dp × cp, and every gradient
after the dp × cp all-reduce. Also: activation bytes per rank fall as 1/cp, greedy and sampled
generation equal serial's, and bad sizes are refused on every rank before any communication.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm, track_saved
from minitp import functional as F
from minitp.nn import GPT, GPTConfig, placement
from minitp.parallel.context.layers import KINDS
from minitp.parallel.data.data_parallel import average_over_data_parallel, split_batch
from minitp.parallel.data.sync import all_reduce_gradients
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.tensor.shard import gather_serial_grads
from minitp.testing import max_error
from parallel_helpers import reset_dropout, value_error

WORLD = MPI.COMM_WORLD
SAME = 1e-12
# 8 heads: tp × cp ≤ 8 divides them (Ulysses); 16 tokens: 2·cp chunks of whole tp blocks for cp·tp ≤ 8
CONFIG = dict(vocab=24, seq_len=16, hidden=16, heads=8, layers=2, dropout=0.1, seed=5, dtype=numpy.float64)


def batch(shape, vocab=CONFIG["vocab"], seed=0):
    windows = numpy.random.default_rng(seed).integers(0, vocab, (shape[0] + 1, shape[1]))
    return windows[:-1], windows[1:]


def meshes(sequence_parallel):
    """(tp, cp, dp) for this world size: cp > 1 wherever the ranks allow, tp = 2 and dp = 2 beside it."""
    n = WORLD.size
    options = {1: [(1, 1, 1)], 2: [(1, 2, 1)], 4: [(1, 4, 1), (2, 2, 1), (1, 2, 2)], 8: [(2, 4, 1), (2, 2, 2)]}[n]
    return [(tp, cp, dp) for tp, cp, dp in options if tp > 1 or not sequence_parallel or n == 1]


def rows(array, mesh, kind):
    """This cp rank's tokens (axis 0) of a serial (s, ...) array, in its placement's order."""
    layout = "zigzag" if kind == "zigzag" else "contiguous"
    return array[placement.positions([(mesh.cp_rank, mesh.cp_size, layout)], len(array) // mesh.cp_size)[1]]


@pytest.mark.parallel(nprocs=[1, 2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_context_parallel_gpt_matches_serial(kind, sequence_parallel):
    ids, targets = batch((16, 4))
    serial = GPT(GPTConfig(**CONFIG))
    serial_logits = serial(ids)
    serial_loss = F.cross_entropy(serial_logits, targets)
    serial_loss.backward()
    serial_grads = {name: p.grad for name, p in serial.named_parameters()}
    for tp, cp, dp in meshes(sequence_parallel):
        mesh = comm.init(tp=tp, cp=cp, dp=dp)
        where = f"tp {tp} cp {cp} dp {dp} {kind}{' +SP' if sequence_parallel else ''}"
        model = ParallelGPT(GPTConfig(**CONFIG), mesh, sequence_parallel=sequence_parallel, context_parallel=kind)
        local_ids, local_targets = split_batch(ids, mesh), split_batch(targets, mesh)
        logits = model(local_ids)  # (s/cp, B/dp, V/t): this rank's tokens, columns, vocabulary block
        expected = comm.split(split_batch(rows(serial_logits.data, mesh, kind), mesh), mesh.tp, axis=-1)
        parallel_assert(max_error(logits, expected) <= SAME, f"{where}: logits {max_error(logits, expected):.1e}")

        reset_dropout(model)  # the loss's forward draws the masks the logits' did
        loss = model.loss(local_ids, local_targets)
        loss.backward()
        all_reduce_gradients(model, mesh)
        mean_loss = average_over_data_parallel(loss.item(), mesh)
        parallel_assert(abs(mean_loss - serial_loss.item()) <= SAME, f"{where}: loss {mean_loss} vs {serial_loss.item()}")
        grads = gather_serial_grads(model, mesh.tp)
        errors = {name: max_error(grads[name], serial_grads[name]) for name in serial_grads}
        worst = max(errors, key=errors.get)
        parallel_assert(errors[worst] <= SAME, f"{where}: gradient of {worst} off by {errors[worst]:.1e}")


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("kind", KINDS)
def test_activation_bytes_per_rank_fall_as_one_over_cp(kind):
    """What one rank keeps for backward (track_saved) over the whole model's forward, the same global batch,
    cp = 1, 2, 4: everything the model keeps is per token, so cp ranks keep 1/cp each (Ulysses' attention
    core also keeps one 0-d 1/√d constant per layer, e bytes, whatever cp)."""
    ids, targets = batch((16, 2), seed=4)
    saved = {}
    for cp in (1, 2, 4):
        mesh = comm.init(cp=cp, dp=WORLD.size // cp)
        model = ParallelGPT(GPTConfig(**CONFIG), mesh, context_parallel=kind)
        with track_saved() as kept:
            model.loss(ids, targets)  # every dp replica the same batch: only cp changes what a rank holds
        saved[cp] = kept.total
    constant = CONFIG["layers"] * 8 if kind == "ulysses" else 0
    for cp in (2, 4):
        parallel_assert(saved[cp] - constant == (saved[1] - constant) / cp,
                        f"{kind}: cp={cp} keeps {saved[cp]:,} B, 1/{cp} of {saved[1]:,} is {saved[1] / cp:,.0f}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_generate_matches_serial(kind):
    mesh = comm.init(cp=WORLD.size)
    config = {**CONFIG, "seq_len": 8}  # the context slides past seq_len; padded to 2·cp for zigzag
    serial, model = GPT(GPTConfig(**config)), ParallelGPT(GPTConfig(**config), mesh, context_parallel=kind)
    prompt = batch((3, 2))[0]
    greedy, expected_greedy = model.generate(prompt, 7), serial.generate(prompt, 7)
    sampled = model.generate(prompt, 7, temperature=0.9, rng=numpy.random.default_rng(4))
    expected_sampled = serial.generate(prompt, 7, temperature=0.9, rng=numpy.random.default_rng(4))
    parallel_assert(numpy.array_equal(greedy, expected_greedy), f"greedy {greedy.T} vs {expected_greedy.T}")
    parallel_assert(numpy.array_equal(sampled, expected_sampled), f"sampled {sampled.T} vs {expected_sampled.T}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_bad_sizes_are_refused_on_every_rank_before_any_communication():
    cp = WORLD.size
    mesh = comm.init(cp=cp)
    zigzag = ParallelGPT(GPTConfig(**CONFIG), mesh, context_parallel="zigzag")
    error, sent = value_error(lambda: zigzag(batch((3 * cp, 2))[0]))  # cp blocks, but not 2·cp chunks
    parallel_assert(error is not None and f"2·{cp}" in error and "zigzag" in error and sent == 0, f"{error}")
    ring = ParallelGPT(GPTConfig(**CONFIG), mesh, context_parallel="ring")
    error, sent = value_error(lambda: ring(batch((cp + 1, 2))[0]))
    parallel_assert(error is not None and f"cp={cp}" in error and sent == 0, f"{error}")
    heads = {2: 3, 4: 6}[cp]  # cp does not divide them (tp = 1)
    error, sent = value_error(lambda: ParallelGPT(GPTConfig(**{**CONFIG, "heads": heads, "hidden": 12}), mesh,
                                                            context_parallel="ulysses"))
    parallel_assert(error is not None and "heads" in error and "Ulysses" in error and sent == 0, f"{error}")
    error, sent = value_error(lambda: ParallelGPT(GPTConfig(**CONFIG), mesh))
    parallel_assert(error is not None and "context_parallel" in error and sent == 0, f"{error}")


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_reruns_the_ring_and_the_all_to_alls_to_the_same_gradients(kind, recompute):
    """A context-parallel TransformerBlock with recomputation == the same block without: the re-run in
    backward communicates again and draws the same dropout masks (attention dropout included)."""
    from minitp import Tensor
    from minitp.nn import TransformerBlock
    from minitp.parallel import ContextParallelLayers

    mesh = comm.init(cp=WORLD.size)
    layers = ContextParallelLayers(mesh.tp, mesh.cp, kind)
    x = rows(numpy.random.default_rng(2).standard_normal((16, 2, 16)), mesh, kind)
    upstream = rows(numpy.random.default_rng(3).standard_normal((16, 2, 16)), mesh, kind)
    results = []
    for how in (None, recompute):
        block = TransformerBlock(16, 8, dropout=0.1, attention_dropout=0.1, seed=4, dtype=numpy.float64,
                                 recompute=how, layers=layers)
        leaf = Tensor(x.copy(), requires_grad=True)
        y = block(leaf)
        y.backward(upstream)
        results.append([y.data, leaf.grad] + [p.grad for p in block.parameters()])
    worst = max(max_error(a, b) for a, b in zip(*results))
    parallel_assert(worst <= SAME, f"{kind}, recompute={recompute}: {worst:.1e}")
