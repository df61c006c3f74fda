"""minitp.plan against minitp's measurements where context parallelism meets ZeRO and pipeline stages.

On 4 ranks (tiny sizes: s 8, h 16, 4 heads, float32):

- cp 2 × dp 2 and cp 4 × dp 1 with ZeRO 1, 2 and 3 (ring attention, 2 KiB buckets so that the padding
  shows): the states are sharded over the dp·cp ranks of ``mesh.dp_cp`` (``parallel.data.zero``'s
  docstring), so each rank's parameter, gradient and optimizer bytes (per dp·cp rank: the padding rule),
  its activations and the collective log of a whole ``train_step`` equal the plan's, byte for byte;
- pp 2 × cp 2 (``PipelineGPT(..., context_parallel=kind)``; ring, zigzag and Ulysses; AFAB, 1F1B and
  interleaved; tied and untied; ZeRO 0, 1 and 2 with 2 KiB buckets): each stage's parameters, gradients
  (at the end of backward), AdamW state (ZeRO: per dp·cp rank), the microbatch-chunks and bytes it holds
  at its peak and every forward's saved bytes (``StageRun``), and the log of a whole pipelined
  ``train_step`` (cp's ring or all-to-alls, pp's sends, the dp × cp all-reduces).
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.nn import AdamW, GPTConfig
from minitp.plan import Choices, Mesh, Model, plan
from minitp.plan import schedule
from minitp.plan.communication import by_group_op
from plan_measure import measured_step, parameter_bytes, saved_by_the_loss
from test_plan import differences

WORLD = MPI.COMM_WORLD


@pytest.mark.parallel(nprocs=[4])
def test_zero_over_dp_times_cp_is_planned_to_the_byte():
    from minitp.parallel.data.zero import ZeroOptimizer
    from minitp.parallel.data.zero3 import FullyShardedOptimizer
    from minitp.parallel.gpt import ParallelGPT

    failures, checked = [], 0
    for cp, zero, tie in [(2, 1, False), (2, 2, True), (2, 3, False), (2, 3, True), (4, 1, True), (4, 2, False),
                          (4, 3, False)]:
        mesh = comm.init(cp=cp, dp=WORLD.size // cp)
        config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, tie_embeddings=tie, dtype="float32")
        model = ParallelGPT(config, mesh, context_parallel="ring")
        batch, bucket = 4, 2048
        rng = numpy.random.default_rng(0)
        ids, targets = rng.integers(0, 64, (8, batch)), rng.integers(0, 64, (8, batch))
        saved = saved_by_the_loss(model, mesh, ids, targets)
        optimizer = AdamW(model.named_parameters())
        optimizer = (FullyShardedOptimizer(optimizer, model, mesh) if zero == 3 else
                     ZeroOptimizer(optimizer, mesh, bucket, stage=zero))
        step = measured_step(model, optimizer, ids, targets, mesh)
        stage = plan(Model.of(config), Mesh(dp=mesh.dp_size, cp=cp),
                     Choices(micro_batch=batch // mesh.dp_size, zero=zero, bucket_bytes=bucket)).stages[0]
        found = {"activations": (stage.memory["activations"].value, saved),
                 "parameters": (stage.memory["parameters"].value, parameter_bytes(model, optimizer)),
                 "gradients": (stage.memory["gradients"].value, step.seen["gradients"]),
                 "optimizer state": (stage.optimizer_state_of(mesh.dp_cp.rank), optimizer.state_bytes())}
        found = {key: pair for key, pair in found.items() if pair[0] != pair[1]}
        found.update(differences(by_group_op(stage.messages), step.collectives))
        unmarked = [name for name, figure in stage.memory.items() if not figure.measured]
        if found or unmarked:
            failures.append(((cp, zero, tie), found, unmarked))
        checked += 1
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
    parallel_assert(checked == 7)


@pytest.mark.parallel(nprocs=[4])
def test_pipeline_with_context_parallelism_is_planned_to_the_byte():
    from minitp import pipeline
    from minitp.parallel.data.sync import AllReduceGradients
    from minitp.parallel.data.zero import ZeroOptimizer
    from minitp.training import Pipelined

    failures = []
    mesh = comm.init(pp=2, cp=2)
    for kind, name, m, v, tie, dropout, zero in [("ring", "1f1b", 4, 1, True, 0.1, 0),
                                                 ("zigzag", "afab", 2, 1, False, 0.1, 0),
                                                 ("ulysses", "interleaved", 2, 2, True, 0.0, 0),
                                                 ("ring", "interleaved", 4, 2, False, 0.1, 0),
                                                 ("zigzag", "1f1b", 2, 1, True, 0.1, 1), ("ring", "afab", 2, 1, True, 0.0, 2)]:
        config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=4 * v, dropout=dropout,
                           tie_embeddings=tie, dtype="float32")
        model = pipeline.PipelineGPT(config, mesh, False, v, context_parallel=kind)
        optimizer = AdamW(model.named_parameters())
        batch = 2 * m
        rng = numpy.random.default_rng(0)
        ids, targets = rng.integers(0, 64, (8, batch)), rng.integers(0, 64, (8, batch))
        run = pipeline.forward_backward(model, ids, targets, mesh, name, m)  # the StageRun: what it held
        if zero:
            optimizer, gradients = ZeroOptimizer(optimizer, mesh, 2048, stage=zero), None
        else:
            gradients = AllReduceGradients(model, mesh, 2048)
        # the whole step: schedule, tied table, dp × cp, norm, loss
        measured = measured_step(model, optimizer, ids, targets, mesh, gradients, forward_backward=Pipelined(name, m))
        predicted = plan(Model.of(config), Mesh(pp=2, cp=2, virtual_stages=v),
                         Choices(micro_batch=batch // m, global_batch=batch, schedule=name, cp_kind=kind,
                                 zero=zero, bucket_bytes=2048))
        stage = predicted.stages[mesh.pp_rank]
        chunk_bytes = [stage.activation_per_chunk[k * 2 + mesh.pp_rank] for kind_, _, k in
                       schedule.order(name, 2, m, v, mesh.pp_rank) if kind_ == "F"]
        found = {"peak_held": (stage.held, run.peak_held),
                 "peak_bytes": (stage.memory["activations"].value, run.peak_bytes),
                 "saved per forward": (chunk_bytes, run.saved_bytes),
                 "parameters": (stage.memory["parameters"].value, sum(p.data.nbytes for p in model.parameters())),
                 "gradients": (stage.memory["gradients"].value, measured.seen["gradients"]),
                 "optimizer state": ((stage.optimizer_state_of(mesh.dp_cp.rank) if zero else
                                      stage.memory["optimizer state"].value),
                                     optimizer.state_bytes())}
        found = {key: pair for key, pair in found.items() if pair[0] != pair[1]}
        found.update(differences(by_group_op(stage.messages), measured.collectives))
        unmarked = [key for key, figure in stage.memory.items() if not figure.measured]
        if found or unmarked:
            failures.append(((kind, name, m, v, tie, zero), found, unmarked))
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
