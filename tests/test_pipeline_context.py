"""Pipeline parallelism × context parallelism against the serial nn.GPT, float64, dropout on.

Each pipeline stage splits the sequence over cp by ring attention, zigzag or Ulysses
(``PipelineGPT(..., context_parallel=kind)``): what crosses a stage boundary is this rank's (s/cp, b/m, h)
block, the loss is the mean over its s/cp tokens, the gradients are averaged over dp × cp. One training
step (``minitp.training.train_step`` with ``Pipelined(schedule, m)``: the schedule, the tied table summed
over the two ends, the dp × cp all-reduce, the optimizer) on pp = 2 × cp = 2 (4 ranks), every schedule,
with and without tied embeddings, against the serial step on the whole batch: the loss, the gradient
norm, every gradient and every updated parameter within 1e-12 (embedding, residual and attention
dropout at 0.1, so every mask must land where the serial one does: its microbatch's columns AND its cp
rank's tokens). On 8 ranks, pp2 × cp2 × tp2 with sequence parallelism and pp2 × cp2 × dp2. Sizes: seq
8, batch 4, hidden 16, 4 heads, 4 layers (one block per chunk when interleaved).
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp import functional as F
from minitp.nn import GPT, GPTConfig
from minitp.nn.optim import SGD
from minitp.parallel.context.layers import KINDS
from minitp.parallel.data.data_parallel import clip_grad_norm
from minitp.parallel.tensor.shard import gather_serial_grads, gather_serial_state
from minitp.pipeline import PipelineGPT, forward_backward
from minitp.training import Pipelined, train_step
from minitp.testing import max_error
from parallel_helpers import value_error

WORLD = MPI.COMM_WORLD
SAME = 1e-12
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=4, dropout=0.1, seed=7, dtype="float64")
BATCH, LR = 4, 0.5
CASES = {"afab": (2, 1), "1f1b": (4, 1), "interleaved": (2, 2)}  # schedule: (microbatches, virtual stages)


def batch(seq=CONFIG["seq_len"], seed=0):
    windows = numpy.random.default_rng(seed).integers(0, CONFIG["vocab"], (seq + 1, BATCH))
    return windows[:-1], windows[1:]


def config(tie_embeddings):
    return GPTConfig(**CONFIG, tie_embeddings=tie_embeddings)


def serial_step(tie_embeddings, ids, targets):
    """The serial step on the whole batch: (loss, norm, {name: gradient}, {name: updated value})."""
    model = GPT(config(tie_embeddings))
    optimizer = SGD(model.parameters(), lr=LR)
    loss = F.cross_entropy(model(ids), targets)
    loss.backward()
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    norm = clip_grad_norm(model, None)
    optimizer.step()
    return loss.item(), norm, grads, model.state_dict()


def pipeline_step(mesh, kind, schedule, tie_embeddings, ids, targets, sequence_parallel=False, microbatches=None):
    """One step of the pipeline's own training step on ``mesh``: (loss, norm, gradients, updated values),
    each gathered to the serial names and shapes over tp (the stage's part of the model only)."""
    m, v = CASES[schedule]
    model = PipelineGPT(config(tie_embeddings), mesh, sequence_parallel, v, context_parallel=kind)
    optimizer = SGD(model.parameters(), lr=LR)
    schedule_run = Pipelined(schedule, microbatches or m)
    loss, norm = train_step(model, optimizer, ids, targets, mesh, forward_backward=schedule_run)
    return loss, norm, gather_serial_grads(model, mesh.tp), gather_serial_state(model, mesh.tp)


def compare(where, mesh, ran, expected):
    """Assert the pipelined step ``ran`` equals the serial ``expected``, on every rank; returns the worst
    difference."""
    loss, norm, grads, state = ran
    serial_loss, serial_norm, serial_grads, serial_state = expected
    held = set().union(*mesh.pp.comm.allgather(set(grads)))
    parallel_assert(held == set(serial_grads), f"{where}: the stages hold every parameter once: {sorted(held)}")
    grad_error = max(max_error(grads[name], serial_grads[name]) for name in grads)
    state_error = max(max_error(state[name], serial_state[name]) for name in state)
    worst = max(abs(loss - serial_loss), abs(norm - serial_norm) / serial_norm, grad_error, state_error)
    parallel_assert(worst <= SAME, f"{where}: loss {loss} vs {serial_loss}, norm {norm} vs {serial_norm}, "
                                   f"gradients {grad_error:.1e}, updated parameters {state_error:.1e}")
    return worst


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", list(CASES))
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_pipeline_with_context_parallelism_equals_the_serial_step(kind, schedule, tie_embeddings):
    ids, targets = batch()
    mesh = comm.init(pp=2, cp=2)
    compare(f"pp 2 × cp 2, {kind}, {schedule}, tied {tie_embeddings}", mesh,
            pipeline_step(mesh, kind, schedule, tie_embeddings, ids, targets),
            serial_step(tie_embeddings, ids, targets))


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_shorter_than_seq_len_equals_the_serial_step(kind):
    """s = 4 < seq_len = 8 (zigzag: 2·cp = 4 chunks of one token): the shape on the wire follows the batch."""
    ids, targets = batch(seq=4, seed=1)
    mesh = comm.init(pp=2, cp=2)
    compare(f"s = 4, {kind}", mesh, pipeline_step(mesh, kind, "1f1b", True, ids, targets),
            serial_step(True, ids, targets))


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("kind", KINDS)
def test_each_boundary_carries_this_ranks_tokens_only(kind):
    """Every activation and gradient between the stages is this cp rank's (s/cp, b/m, h) block, to the rank
    with the same cp coordinate on the other stage."""
    mesh = comm.init(pp=2, cp=2)
    ids, targets = batch(seed=2)
    m = 2
    model = PipelineGPT(config(False), mesh, context_parallel=kind)
    with comm.log_collectives() as log:
        forward_backward(model, ids, targets, mesh, "1f1b", m)
    messages = log.select("send") + log.select("recv")
    nbytes = CONFIG["seq_len"] // 2 * BATCH // m * CONFIG["hidden"] * 8
    parallel_assert(len(messages) == 2 * m and all(x.group == "pp" and x.payload_bytes == nbytes for x in messages),
                    f"{kind}: {m} activations and {m} gradients of {nbytes} B each:\n{log.table()}")


@pytest.mark.parallel(nprocs=[4])
def test_sizes_the_layout_does_not_split_are_refused_on_every_rank_before_any_send():
    mesh = comm.init(pp=2, cp=2)
    error, sent = value_error(lambda: PipelineGPT(config(False), mesh))
    parallel_assert(error is not None and "context_parallel" in error and sent == 0, f"no kind: {error!r}")
    error, sent = value_error(lambda: PipelineGPT(config(False), mesh, context_parallel="sideways"))
    parallel_assert(error is not None and "sideways" in error and sent == 0, f"unknown kind: {error!r}")
    error, sent = value_error(lambda: PipelineGPT(GPTConfig(**{**CONFIG, "heads": 3, "hidden": 12}), mesh,
                                                  context_parallel="ulysses"))
    parallel_assert(error is not None and "heads" in error and sent == 0, f"heads: {error!r}")
    for kind, seq, words in (("zigzag", 6, "2·2 = 4 equal chunks"), ("ring", 5, "cp=2"), ("ulysses", 7, "cp=2")):
        model = PipelineGPT(config(True), mesh, context_parallel=kind)
        ids, targets = batch(seq=seq, seed=3)
        error, sent = value_error(lambda: forward_backward(model, ids, targets, mesh, "1f1b", 2))
        parallel_assert(error is not None and words in error and sent == 0,
                        f"{kind}, s = {seq}: {error!r} after {sent} messages")


@pytest.mark.parallel(nprocs=[8])
def test_eight_ranks_with_tensor_and_sequence_parallelism_or_data_parallelism():
    """pp2 × cp2 × tp2 with sequence parallelism (s/(cp·t) tokens on the wire) and pp2 × cp2 × dp2, each
    kind once, the schedules taking turns (oversubscribed in CI: kept small)."""
    ids, targets = batch(seed=4)
    expected = serial_step(True, ids, targets)
    runs = [((1, 2), "zigzag", "interleaved"), ((1, 2), "ring", "1f1b"), ((1, 2), "ulysses", "afab"),
            ((2, 1), "ring", "interleaved"), ((2, 1), "zigzag", "afab"), ((2, 1), "ulysses", "1f1b")]
    for (dp, tp), kind, schedule in runs:
        mesh = comm.init(dp=dp, pp=2, cp=2, tp=tp)
        compare(f"dp {dp} pp 2 cp 2 tp {tp}, {kind}, {schedule}", mesh,
                pipeline_step(mesh, kind, schedule, True, ids, targets, sequence_parallel=tp > 1,
                              microbatches=2), expected)
