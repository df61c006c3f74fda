"""Pipeline parallelism against the serial nn.GPT, float64, dropout on (minitp.pipeline).

Every rank builds the serial GPT from the same seed and runs one step on the whole batch; the stages run
the same step by a schedule, m microbatches, on (dp, pp, tp) meshes of 1, 2, 4 and 8 ranks. Compared within 1e-12: the loss, every parameter's gradient
(gathered over tp, averaged over dp, the tied table summed over the first and last stage), the global
gradient norm (summed over the stages). Then what the schedules promise beside the numbers: each
stage's sends and receives, and the activations it holds at its peak. Sizes: seq 4, batch 8, hidden
8, 2 heads, 8 layers -- one block per chunk at pp × v = 8.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp import functional as F
from minitp.nn import GPT, Dropout, GPTConfig
from minitp.parallel.data.data_parallel import clip_grad_norm
from minitp.parallel.tensor.shard import gather_serial_grads, gather_serial_state
from minitp.parallel.data.sync import AllReduceGradients
from minitp.pipeline import PipelineGPT, expected_in_flight, forward_backward, plan
from minitp.testing import max_error
from parallel_helpers import value_error
from test_pipeline_schedules import expected_forwards_first  # Megatron's warm-up, written out there

WORLD = MPI.COMM_WORLD
SAME = 1e-12
CONFIG = dict(vocab=16, seq_len=4, hidden=8, heads=2, layers=8, dropout=0.1, seed=3, dtype="float64")
BATCH = 8


def batch(seed=0):
    windows = numpy.random.default_rng(seed).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, BATCH))
    return windows[:-1], windows[1:]


def config(tie_embeddings=False, layers=CONFIG["layers"]):
    return GPTConfig(**{**CONFIG, "layers": layers}, tie_embeddings=tie_embeddings)


def serial(tie_embeddings, ids, targets, layers=CONFIG["layers"]):
    """The serial step: loss, {name: gradient}, global norm."""
    model = GPT(config(tie_embeddings, layers))
    loss = F.cross_entropy(model(ids), targets)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}, clip_grad_norm(model, None)


def meshes():
    """(dp, pp, tp) with dp·pp·tp = the world, pp > 1 where the world allows, dp and tp at most 2; on 8
    ranks (oversubscribed in CI: kept few) dp = pp = tp = 2 and a pipeline of 8 stages."""
    n = WORLD.size
    if n == 8:
        return [(2, 2, 2), (1, 8, 1)]
    shapes = [(dp, n // (dp * tp), tp) for dp in (1, 2) for tp in (1, 2) if n % (dp * tp) == 0]
    return [shape for shape in shapes if shape[1] > 1 or n == 1]


def cases(schedule, p, dp, every=True):
    """(m, v): m < p, m = p and m > p where the replica's batch allows (interleaved: m = p and 2p, v = 2
    and 4); with ``every=False`` only the first m > 1 of them."""
    per_replica = BATCH // dp
    if schedule == "interleaved":
        found = [(m, v) for v in (2, 4) if CONFIG["layers"] % (p * v) == 0 and p > 1
                 for m in (p, 2 * p) if per_replica % m == 0][:3]
    else:
        found = [(m, 1) for m in sorted({max(1, p // 2), p, 2 * p}) if per_replica % m == 0]
    if WORLD.size == 8:
        every = False
    return found if every else [case for case in found if case[0] > 1][:1]


def pipelined(mesh, schedule, m, v, sequence_parallel, tie_embeddings, ids, targets, layers=CONFIG["layers"]):
    model = PipelineGPT(config(tie_embeddings, layers), mesh, sequence_parallel, v)
    run = forward_backward(model, ids, targets, mesh, schedule, m)
    AllReduceGradients(model, mesh).finish()
    return model, run


@pytest.mark.parallel(nprocs=[1, 2, 4, 8])
@pytest.mark.parametrize("schedule", ["afab", "1f1b", "interleaved"])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_every_schedule_equals_the_serial_step(schedule, sequence_parallel, tie_embeddings):
    """Every m (< p, = p, > p) on the pure pipeline; one m on the meshes with tp or dp, and on 8 ranks."""
    ids, targets = batch()
    references, ran = {}, 0
    for dp, pp, tp in meshes():
        mesh = comm.init(dp=dp, pp=pp, tp=tp)
        for m, v in cases(schedule, pp, dp, every=dp == tp == 1):
            layers = max(4, pp * v)  # 4 blocks, or one per chunk: small, and a stage may hold several
            if layers not in references:
                references[layers] = serial(tie_embeddings, ids, targets, layers)
            serial_loss, serial_grads, serial_norm = references[layers]
            model, run = pipelined(mesh, schedule, m, v, sequence_parallel, tie_embeddings, ids, targets, layers)
            where = f"dp {dp} pp {pp} tp {tp}, m {m} v {v}"
            loss = mesh.dp.comm.allreduce(run.loss) / dp
            parallel_assert(abs(loss - serial_loss) <= SAME, f"{where}: loss {loss} vs {serial_loss}")
            grads = gather_serial_grads(model, mesh.tp)
            worst = max(max_error(grads[name], serial_grads[name]) for name in grads)
            parallel_assert(worst <= SAME, f"{where}: gradients {worst:.1e}")
            held = set().union(*mesh.pp.comm.allgather(set(grads)))
            parallel_assert(held == set(serial_grads), f"{where}: the stages hold every parameter once: {held}")
            norm = clip_grad_norm(model, None, mesh)
            parallel_assert(abs(norm - serial_norm) <= SAME * serial_norm, f"{where}: norm {norm} vs {serial_norm}")
            ran += 1
    parallel_assert(ran > 0 or schedule == "interleaved" and WORLD.size == 1, "some mesh ran")


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("schedule", ["afab", "1f1b", "interleaved"])
def test_each_stage_holds_the_schedules_activations_at_its_peak(schedule):
    mesh = comm.init(pp=WORLD.size)
    p, r = mesh.pp_size, mesh.pp_rank
    ids, targets = batch(1)
    for m, v in cases(schedule, p, 1):
        _, run = pipelined(mesh, schedule, m, v, False, False, ids, targets)
        # the count written out in the test (Megatron's warm-up + 1), not minitp's own expected_in_flight:
        # a warm-up one forward too long computes the same numbers, and only this count sees it
        expected = expected_forwards_first(schedule, p, m, v, r)
        ran = [action.kind for _, _, action in run.rows]
        forwards = ran.index("B")
        parallel_assert(run.peak_held == expected == forwards == expected_in_flight(schedule, p, m, v, r),
                        f"m {m} v {v} stage {r}: held {run.peak_held}, {forwards} forwards ran before the first "
                        f"backward, expected {expected}")
        # in bytes: replay this stage's forwards' saved bytes through its plan; with one chunk every
        # microbatch keeps the same bytes, so the peak is exactly expected × one microbatch's
        per_forward, held, peak = iter(run.saved_bytes), {}, 0
        for kind, microbatch, chunk in plan(schedule, p, m, v, r):
            if kind == "F":
                held[microbatch, chunk] = next(per_forward)
            else:
                del held[microbatch, chunk]
            peak = max(peak, sum(held.values()))
        parallel_assert(run.peak_bytes == peak, f"stage {r}: peak {run.peak_bytes} B vs {peak} B")
        if v == 1:
            parallel_assert(len(set(run.saved_bytes)) == 1 and run.peak_bytes == expected * run.saved_bytes[0],
                            f"stage {r}: {run.peak_bytes} B = {expected} × {run.saved_bytes[0]} B")
        sent = m * v - (m if r == p - 1 else 0)  # every forward's output but the last model chunk's
        parallel_assert(run.freed_bytes == sent * 4 * (BATCH // m) * 8 * 8, f"freed {run.freed_bytes} B after sending")


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("schedule", ["afab", "1f1b"])
def test_each_stage_sends_and_receives_one_activation_and_one_gradient_per_microbatch(schedule):
    mesh = comm.init(pp=WORLD.size)
    p, r, m = mesh.pp_size, mesh.pp_rank, 4
    ids, targets = batch(2)
    with comm.log_collectives() as log:
        pipelined(mesh, schedule, m, 1, False, False, ids, targets)
    nbytes = 4 * (BATCH // m) * 8 * 8  # (s, b/m, h) float64
    sends, receives = log.select("send"), log.select("recv")
    expected = m * ((r < p - 1) + (r > 0))
    parallel_assert(len(sends) == len(receives) == expected, f"stage {r}: {len(sends)} sends, {len(receives)} receives")
    parallel_assert(all(x.payload_bytes == nbytes and x.group == "pp" for x in sends + receives), log.table())
    parallel_assert(log.total_ring_bytes("send") == expected * nbytes, "a send's ring bytes are its payload")
    between_stages = [x for x in log if x.group != "tp"]  # (tp = 1 logs its no-op all-reduces too)
    parallel_assert(len(between_stages) == 2 * expected + 1 and log.count("broadcast", tag="loss") == 1,
                    "the sends, the receives and the loss's broadcast:\n" + log.table())


@pytest.mark.parallel(nprocs=[4])
def test_data_parallel_reduces_once_per_stage_after_its_last_backward():
    mesh = comm.init(dp=2, pp=2)
    ids, targets = batch(4)
    with comm.log_collectives() as log:
        pipelined(mesh, "1f1b", 4, 1, False, True, ids, targets)
    kinds = [(x.op, x.group) for x in log if x.group != "tp"]
    reduces = [i for i, kind in enumerate(kinds) if kind == ("all_reduce", "dp")]
    last_message = max(i for i, (op, _) in enumerate(kinds) if op in ("send", "recv"))
    # both stages of pp = 2 hold the tied table, in a bucket of its own: the stage's bucket, then the table's
    parallel_assert(len(reduces) == 2 and reduces[0] > last_message, f"two dp all-reduces, after the pipeline: {kinds}")
    tied = [i for i, kind in enumerate(kinds) if kind == ("all_reduce", "embedding")]
    parallel_assert(len(tied) == 1 and last_message < tied[0] < reduces[-1], "the tied table summed over the ends first")


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_directional_gradcheck_through_the_stage_boundaries(tie_embeddings):
    """Every parameter of every stage moved along one random direction: the derivative of the pipelined
    loss along it, by finite differences, against Σ ⟨gradient, direction⟩ over the stages."""
    mesh = comm.init(pp=WORLD.size)
    ids, targets = batch(3)
    model = PipelineGPT(config(tie_embeddings), mesh)
    dropouts = [module for module in model.modules() if isinstance(module, Dropout)]

    def loss():
        for dropout in dropouts:  # the same masks at every evaluation
            dropout.counter = 0
        model.zero_grad()
        return forward_backward(model, ids, targets, mesh, "1f1b", 2).loss

    loss()
    named = list(model.named_parameters())
    # the direction of a parameter depends on its name only: a tied table's two copies move together
    directions = {name: numpy.random.default_rng([5, sum(map(ord, name))]).standard_normal(p.shape) for name, p in named}
    mesh.pp.comm.barrier()
    AllReduceGradients(model, mesh).finish()
    own = sum(float(numpy.vdot(p.grad, directions[name])) for name, p in named if not getattr(p, "tied_copy", False))
    analytic = mesh.pp.comm.allreduce(own)
    originals = {name: p.data.copy() for name, p in named}
    values = []
    for sign in (1, -1):
        for name, p in named:
            p.data[...] = originals[name] + sign * 1e-6 * directions[name]
        values.append(loss())
    numeric = (values[0] - values[1]) / 2e-6
    error = abs(analytic - numeric) / max(1.0, abs(analytic))
    parallel_assert(error <= 1e-6, f"analytic {analytic:.9e}, numeric {numeric:.9e}: {error:.1e}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_bad_pipelines_are_refused_on_every_rank_before_any_send():
    mesh = comm.init(pp=WORLD.size)
    p = mesh.pp_size
    ids, targets = batch()
    model = PipelineGPT(GPTConfig(**CONFIG), mesh)
    wrong = {
        "layers": lambda: PipelineGPT(GPTConfig(**{**CONFIG, "layers": p + 1}), mesh),
        "microbatches must be": lambda: forward_backward(model, ids, targets, mesh, "1f1b", 0),
        "interleaved": lambda: forward_backward(PipelineGPT(GPTConfig(**CONFIG), mesh, virtual_stages=2),
                                                ids, targets, mesh, "interleaved", p + 1),
        "not divisible by 3 microbatches": lambda: forward_backward(model, ids, targets, mesh, "afab", 3),
        "dp × pp × cp × tp": lambda: comm.init(pp=p, tp=2, dp=2),
    }
    for words, build in wrong.items():
        error, collectives = value_error(build)
        parallel_assert(error is not None and words in error and collectives == 0,
                        f"{words!r}: {error!r} after {collectives} messages")


@pytest.mark.parallel(nprocs=[2, 4])
def test_every_stage_starts_from_the_serial_weights_and_builds_only_its_own():
    mesh = comm.init(pp=WORLD.size)
    full = GPT(GPTConfig(**CONFIG, tie_embeddings=True)).state_dict()
    model = PipelineGPT(GPTConfig(**CONFIG, tie_embeddings=True), mesh)
    mine = gather_serial_state(model, mesh.tp)
    worst = max(max_error(array, full[name]) for name, array in mine.items())
    parallel_assert(worst == 0.0, f"bit for bit: {worst}")
    blocks = {name.split(".")[1] for name in mine if name.startswith("blocks.")}
    parallel_assert(len(blocks) == CONFIG["layers"] // mesh.pp_size, f"stage {mesh.pp_rank} holds blocks {blocks}")
    ends = ("wte.weight" in mine, "ln_f.weight" in mine)
    parallel_assert(ends == (mesh.first_stage or mesh.last_stage, mesh.last_stage), f"{ends}: {model.holds()}")


@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize("schedule", ["afab", "1f1b"])
def test_every_send_is_complete_when_the_step_ends_above_the_eager_limit(schedule, monkeypatch):
    """A send's buffer must live until MPI has read it. Below MPI's eager limit (MPICH: tens to a few
    hundred KiB over shared memory) MPI copies the message at once, so an engine that dropped its pending
    sends unwaited would pass every other test; above it the data moves only once the receiver has
    matched it, and a buffer freed before then is read after its release. So each activation and
    gradient here is 2 MiB, and every request the engine posted must be complete when the step returns:
    MPI sets a request to MPI_REQUEST_NULL once a Wait or a successful Test has completed it, and a
    request nobody completed stays live (whatever the network did)."""
    posted, sizes = [], []
    send = comm.send

    def recording_send(x, *args, **kwargs):
        pending = send(x, *args, **kwargs)
        posted.append(pending)
        sizes.append(x.nbytes)
        return pending

    monkeypatch.setattr(comm, "send", recording_send)  # minitp.comm: the engine calls comm.send
    # (s, b/m, h) = (32, 512, 16) float64 = 2 MiB per message; h small, so the compute stays small
    config = GPTConfig(vocab=16, seq_len=32, hidden=16, heads=2, layers=2, dropout=0.0, seed=3, dtype="float64")
    m, columns = 2, 512
    windows = numpy.random.default_rng(6).integers(0, config.vocab, (config.seq_len + 1, m * columns))
    mesh = comm.init(pp=WORLD.size)
    forward_backward(PipelineGPT(config, mesh), windows[:-1], windows[1:], mesh, schedule, m)
    live = [pending for pending in posted if pending.request != MPI.REQUEST_NULL]
    for pending in live:  # complete them here, so that a failure leaves no send behind for the next test
        pending.request.Wait()
    parallel_assert(len(posted) == m and min(sizes) == 2 ** 21, f"{m} messages of 2 MiB each: {sizes}")
    parallel_assert(not live, f"{len(live)} of the {len(posted)} sends of 2 MiB still in flight after the step")


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_a_batch_shorter_than_seq_len_equals_the_serial_step(schedule):
    """nn.GPT and ParallelGPT take any s <= seq_len, so the pipeline must too. Before, each stage sized
    the activation it receives from config.seq_len: stage 0 sent (s, b/m, h), stage 1 refused it ("sender
    and receiver disagree on the shape") on its own, and the job hung. Every rank is given the same (s, b)
    ids, so every stage now derives the shape crossing the wire from them. s = 2 < seq_len = 4, on
    (pp, tp) = (2, 1) and (2, 2), with and without sequence parallelism (s/t tokens per rank)."""
    mesh = comm.init(pp=2, tp=WORLD.size // 2)
    windows = numpy.random.default_rng(7).integers(0, CONFIG["vocab"], (3, BATCH))
    ids, targets = windows[:-1], windows[1:]
    v = 2 if schedule == "interleaved" else 1
    serial_loss, serial_grads, _ = serial(True, ids, targets, layers=4)
    for sequence_parallel in (False, True):
        model, run = pipelined(mesh, schedule, 2, v, sequence_parallel, True, ids, targets, layers=4)
        grads = gather_serial_grads(model, mesh.tp)
        worst = max(max_error(grads[name], serial_grads[name]) for name in grads)
        parallel_assert(abs(run.loss - serial_loss) <= SAME and worst <= SAME,
                        f"SP {sequence_parallel}: loss {run.loss} vs {serial_loss}, gradients {worst:.1e}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_a_batch_longer_than_seq_len_is_refused_on_every_rank_before_any_send():
    """Stage 0's embedding refuses s > seq_len, but only stage 0 runs it: the others would wait for its
    activation forever. (And under sequence parallelism, an s that t does not divide.)"""
    mesh = comm.init(pp=2, tp=WORLD.size // 2)
    windows = numpy.random.default_rng(8).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 2, BATCH))
    model = PipelineGPT(config(layers=4), mesh)
    error, messages = value_error(lambda: forward_backward(model, windows[:-1], windows[1:], mesh, "1f1b", 2))
    parallel_assert(error is not None and "longer than the model's seq_len" in error and messages == 0,
                    f"{error!r} after {messages} messages")
    if mesh.tp_size > 1:
        model = PipelineGPT(config(layers=4), mesh, sequence_parallel=True)
        short = windows[:4]  # s = 3: tp = 2 does not divide it
        error, messages = value_error(lambda: forward_backward(model, short[:-1], short[1:], mesh, "1f1b", 2))
        parallel_assert(error is not None and "sequence length" in error and messages == 0,
                        f"{error!r} after {messages} messages")
