"""ParallelGPT and data parallelism against the serial nn.GPT, in float64 with dropout on.

Every rank builds the serial GPT from the same seed and runs it on the whole batch; the parallel model
runs on its mesh (tp ranks, dp replicas each on its slice of the batch). Compared within 1e-12: the
logits (this rank's vocabulary columns), the loss (averaged over dp), every gradient (gathered over tp,
averaged over dp), the global gradient norm and the clipped gradients. Sizes divide 1, 2, 3 and 4 ranks:
vocab 24, seq 12, 12 heads; batch 3 is odd (dp tests use 4).
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp import functional as F
from minitp.nn import GPT, GPTConfig
from minitp.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from minitp.parallel.data.sync import all_reduce_gradients
from minitp.parallel.data.data_parallel import (
    average_over_data_parallel,
    clip_grad_norm,
    split_batch,
)
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.tensor.shard import gather_serial_grads, gather_serial_state
from minitp.testing import max_error

WORLD = MPI.COMM_WORLD
SAME = 1e-12
CONFIG = dict(vocab=24, seq_len=12, hidden=24, heads=12, layers=2, dropout=0.1, seed=5, dtype=numpy.float64)


def batch(shape, vocab, seed=0):
    """ids (s, B) and targets (s, B), the same on every rank."""
    windows = numpy.random.default_rng(seed).integers(0, vocab, (shape[0] + 1, shape[1]))
    return windows[:-1], windows[1:]


def serial_step(tie_embeddings, ids, targets, max_norm):
    """The serial reference, one forward (the dropouts' first masks): model, logits, loss, {name: grad},
    global norm, {name: clipped grad}."""
    model = GPT(GPTConfig(**CONFIG, tie_embeddings=tie_embeddings))
    logits = model(ids)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    norm = clip_grad_norm(model, max_norm)
    clipped = {name: p.grad for name, p in model.named_parameters()}
    return model, logits.data, loss.item(), grads, norm, clipped


def worst(actual, expected):
    return max(max_error(actual[name], expected[name]) for name in expected)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_tensor_parallel_gpt_matches_serial(sequence_parallel, tie_embeddings):
    mesh = comm.init(tp=WORLD.size)
    ids, targets = batch((12, 3), CONFIG["vocab"])
    serial, serial_logits, serial_loss, serial_grads, serial_norm, serial_clipped = serial_step(
        tie_embeddings, ids, targets, max_norm=0.5)

    model = ParallelGPT(GPTConfig(**CONFIG, tie_embeddings=tie_embeddings), mesh, sequence_parallel=sequence_parallel)
    names = [name for name, _ in model.named_parameters()]
    parallel_assert(names == [name for name, _ in serial.named_parameters()], "the serial parameter names")
    start = worst(gather_serial_state(model, mesh.tp), GPT(GPTConfig(**CONFIG, tie_embeddings=tie_embeddings)).state_dict())
    parallel_assert(start == 0.0, f"starts from the serial weights: {start:.1e}")

    logits = model(ids)  # this rank's vocabulary columns
    expected_logits = comm.split(serial_logits, mesh.tp, axis=-1)
    parallel_assert(max_error(logits, expected_logits) <= SAME, f"logits {max_error(logits, expected_logits):.1e}")
    loss = vocab_parallel_cross_entropy(logits, targets, group=mesh.tp)
    loss.backward()
    parallel_assert(abs(loss.item() - serial_loss) <= SAME, f"loss {loss.item()} vs {serial_loss}")
    grads = worst(gather_serial_grads(model, mesh.tp), serial_grads)
    parallel_assert(grads <= SAME, f"gradients {grads:.1e}")

    norm = clip_grad_norm(model, 0.5, mesh)
    parallel_assert(abs(norm - serial_norm) <= SAME * serial_norm, f"global norm {norm} vs {serial_norm}")
    parallel_assert(norm > 0.5, "the test clips")
    clipped = worst(gather_serial_grads(model, mesh.tp), serial_clipped)
    parallel_assert(clipped <= SAME, f"clipped gradients {clipped:.1e}")


def data_parallel_meshes():
    """(tp, dp) with tp × dp = the world size and dp > 1."""
    return [pytest.param(tp, WORLD.size // tp, id=f"tp{tp}-dp{WORLD.size // tp}") for tp in (1, 2)
            if WORLD.size % tp == 0 and WORLD.size // tp > 1]


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_data_parallel_matches_serial_with_one_all_reduce(sequence_parallel):
    ids, targets = batch((12, 4), CONFIG["vocab"], seed=1)
    _, _, serial_loss, serial_grads, serial_norm, serial_clipped = serial_step(False, ids, targets, max_norm=0.5)
    for tp, dp in [(p.values[0], p.values[1]) for p in data_parallel_meshes()]:
        mesh = comm.init(tp=tp, dp=dp)
        model = ParallelGPT(GPTConfig(**CONFIG), mesh, sequence_parallel=sequence_parallel)
        loss = model.loss(split_batch(ids, mesh), split_batch(targets, mesh))
        loss.backward()
        local_bytes = sum(p.grad.nbytes for p in model.parameters())
        with comm.log_collectives() as log:
            buckets = all_reduce_gradients(model, mesh)
        reduces = log.select("all_reduce", tag="gradients")
        parallel_assert(buckets == 1 and len(reduces) == 1 and len(log) == 1,
                        f"one all-reduce for all the gradients, got {len(log)}:\n{log.table()}")
        parallel_assert(reduces[0].group == "dp" and reduces[0].payload_bytes == local_bytes,
                        f"over dp, every gradient in it: {reduces[0]}")

        mean_loss = average_over_data_parallel(loss.item(), mesh)
        parallel_assert(abs(mean_loss - serial_loss) <= SAME, f"tp{tp} dp{dp}: loss {mean_loss} vs {serial_loss}")
        grads = worst(gather_serial_grads(model, mesh.tp), serial_grads)
        parallel_assert(grads <= SAME, f"tp{tp} dp{dp}: the averaged gradients {grads:.1e}")
        norm = clip_grad_norm(model, 0.5, mesh)
        parallel_assert(abs(norm - serial_norm) <= SAME * serial_norm, f"tp{tp} dp{dp}: norm {norm} vs {serial_norm}")
        clipped = worst(gather_serial_grads(model, mesh.tp), serial_clipped)
        parallel_assert(clipped <= SAME, f"tp{tp} dp{dp}: clipped gradients {clipped:.1e}")


@pytest.mark.parallel(nprocs=[2])
def test_buckets_split_the_all_reduce_not_the_result():
    mesh = comm.init(tp=1, dp=2)
    ids, targets = batch((12, 4), CONFIG["vocab"], seed=2)
    results = []
    for bucket_bytes in (None, 3000):  # None: everything in one bucket; 3000 B: a few parameters each
        model = ParallelGPT(GPTConfig(**CONFIG), mesh)
        model.loss(split_batch(ids, mesh), split_batch(targets, mesh)).backward()
        sizes = [p.grad.nbytes for p in model.parameters()]
        with comm.log_collectives() as log:
            buckets = all_reduce_gradients(model, mesh, bucket_bytes=bucket_bytes or sum(sizes))
        parallel_assert(log.count("all_reduce", tag="gradients") == buckets, log.table())
        parallel_assert(all(r.payload_bytes <= max(bucket_bytes or sum(sizes), max(sizes)) for r in log),
                        f"no bucket over {bucket_bytes} B unless one parameter is:\n{log.table()}")
        results.append((buckets, {name: p.grad for name, p in model.named_parameters()}))
    (one, whole), (several, bucketed) = results
    parallel_assert(one == 1 and several > 1, f"{one} and {several} buckets")
    parallel_assert(worst(bucketed, whole) <= SAME, f"bucketed vs one bucket: {worst(bucketed, whole):.1e}")


@pytest.mark.parallel(nprocs=[2])
def test_batch_not_divisible_by_dp_raises_on_every_rank():
    mesh = comm.init(tp=1, dp=2)
    ids, _ = batch((12, 3), CONFIG["vocab"])
    try:
        split_batch(ids, mesh)
        error = None
    except ValueError as raised:
        error = str(raised)
    parallel_assert(error is not None and "batch" in error and "3" in error, f"ValueError naming the batch: {error}")


@pytest.mark.parallel(nprocs=[2, 3])
def test_vocabulary_not_divisible_by_tp_raises_on_every_rank():
    mesh = comm.init(tp=WORLD.size)
    try:
        ParallelGPT(GPTConfig(**{**CONFIG, "vocab": 25}), mesh)
        error = None
    except ValueError as raised:
        error = str(raised)
    parallel_assert(error is not None and "vocabulary" in error and "25" in error, f"ValueError: {error}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_generate_matches_serial(sequence_parallel):
    mesh = comm.init(tp=WORLD.size)
    config = {**CONFIG, "seq_len": 8}  # the context slides past seq_len; 8 splits over 1, 2 and 4
    serial = GPT(GPTConfig(**config))
    model = ParallelGPT(GPTConfig(**config), mesh, sequence_parallel=sequence_parallel)
    prompt = batch((3, 2), config["vocab"])[0]  # 3 tokens: not a multiple of tp, padded under SP
    greedy, expected_greedy = model.generate(prompt, 7), serial.generate(prompt, 7)
    sampled = model.generate(prompt, 7, temperature=0.9, rng=numpy.random.default_rng(4))
    expected_sampled = serial.generate(prompt, 7, temperature=0.9, rng=numpy.random.default_rng(4))
    parallel_assert(numpy.array_equal(greedy, expected_greedy), f"greedy {greedy.T} vs {expected_greedy.T}")
    parallel_assert(numpy.array_equal(sampled, expected_sampled), f"sampled {sampled.T} vs {expected_sampled.T}")
    parallel_assert(model.training, "back in training mode")


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_from_serial_takes_the_weights_and_the_dropout_streams(sequence_parallel):
    mesh = comm.init(tp=WORLD.size)
    ids, _ = batch((12, 2), CONFIG["vocab"], seed=3)
    serial = GPT(GPTConfig(**{**CONFIG, "seed": 11}, tie_embeddings=True))
    serial(ids)  # the dropouts' counters move on to 1
    for _, p in serial.named_parameters():  # weights no seed reproduces
        p.data[...] += numpy.random.default_rng(len(p.data.shape)).standard_normal(p.shape) * 0.1
    model = ParallelGPT.from_serial(serial, mesh, sequence_parallel=sequence_parallel)
    parallel_assert(model.tie_embeddings and model.lm_head is None, "tied, as the serial model")
    logits, expected = model(ids), comm.split(serial(ids).data, mesh.tp, axis=-1)  # both draw masks #1
    parallel_assert(max_error(logits, expected) <= SAME, f"logits {max_error(logits, expected):.1e}")
