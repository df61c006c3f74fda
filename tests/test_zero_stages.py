"""ZeRO stages 1, 2 and 3 against the serial step, in float64 with dropout on.

On dp = 2, 3, 4 and tp 2 × dp 2, each stage trains 3 AdamW steps with global-norm clipping (every step
clipped) and must equal the serial model trained the same way: the loss of every step, every parameter
and both Adam moments, gathered back to serial arrays, within 1e-12. The serial run is ``nn.GPT`` with
``nn.AdamW`` on one process: nothing of the sharded code computes the expected values. Overlap,
recomputation and tied embeddings take turns across the runs.
"""
import contextlib

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.parallel import FullyShardedOptimizer, ParallelGPT, ZeroOptimizer
from minitp.parallel.tensor.shard import gather_serial_state, split_axis
from minitp.training import train_step

WORLD = MPI.COMM_WORLD
SAME = 1e-12
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.1, seed=3, dtype="float64")
STEPS, MAX_NORM, LR, BUCKET_BYTES = 3, 0.3, 1e-2, 3000


def batch_at(step):
    windows = numpy.random.default_rng([11, step]).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 12))
    return windows[:-1], windows[1:]


def meshes():
    """(tp, dp): dp = the world at tp 1, and tp 2 × dp 2 at 4 ranks."""
    return [(1, WORLD.size)] + ([(2, 2)] if WORLD.size == 4 else [])


def runs():
    """(stage, overlap, recompute, tie) for each stage, blocking and overlapped; the rest take turns."""
    recomputes, found = (None, "selective", "full"), []
    for stage in (1, 2, 3):
        for overlap in (False, True):
            n = len(found)
            found.append((stage, overlap, recomputes[n % 3], n % 2 == 1))
    return found


def serial(config):
    """The serial run: losses, {name: parameter}, {name: {exp_avg, exp_avg_sq}}."""
    model = GPT(config)
    optimizer = AdamW(model.named_parameters(), lr=LR)
    losses = [train_step(model, optimizer, *batch_at(step), None, max_norm=MAX_NORM)[0] for step in range(STEPS)]
    return losses, model.state_dict(), optimizer.state


def sharded(config, mesh, stage, overlap):
    """The same run on ``mesh`` with ZeRO ``stage``: losses, serial parameters, full moments over tp."""
    model = ParallelGPT(config, mesh, overlap=overlap)
    optimizer = AdamW(model.named_parameters(), lr=LR)
    if stage == 3:
        optimizer = FullyShardedOptimizer(optimizer, model, mesh, overlap=overlap)
    else:
        optimizer = ZeroOptimizer(optimizer, mesh, BUCKET_BYTES, overlap=overlap, stage=stage)
    losses = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=MAX_NORM)[0] for step in range(STEPS)]
    whole = getattr(optimizer, "full_parameters", None)
    if whole is not None:
        with whole():
            state = gather_serial_state(model, mesh.tp)
    else:
        state = gather_serial_state(model, mesh.tp)
    full = optimizer.gathered()  # over the replicas; each tp rank's block
    moments = {}
    for key, parameter in zip(full.keys, full.params):
        axis = split_axis(parameter)
        moments[key] = {name: value if axis is None else comm.all_gather(value, mesh.tp, axis=axis)
                        for name, value in full.state[key].items() if name != "step"}
    return losses, state, moments


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_every_zero_stage_equals_the_serial_adamw_run():
    worst, failures = 0.0, []
    for stage, overlap, recompute, tie in runs():
        config = GPTConfig(**CONFIG, recompute=recompute, tie_embeddings=tie)
        serial_losses, serial_state, serial_moments = serial(config)
        for tp, dp in meshes():
            mesh = comm.init(tp=tp, dp=dp)
            losses, state, moments = sharded(config, mesh, stage, overlap)
            found = {"loss": max(abs(a - b) for a, b in zip(losses, serial_losses))}
            for name, value in serial_state.items():
                found[name] = float(numpy.abs(state[name] - value).max())
                for moment in ("exp_avg", "exp_avg_sq"):
                    found[f"{moment} of {name}"] = float(numpy.abs(moments[name][moment]
                                                                   - serial_moments[name][moment]).max())
            what = max(found, key=found.get)
            worst = max(worst, found[what])
            if found[what] > SAME:
                failures.append(f"stage {stage} tp {tp} dp {dp} overlap {overlap} recompute {recompute} tied {tie}: "
                                f"{what} off by {found[what]:.2e}")
    worst = WORLD.allreduce(worst, op=MPI.MAX)
    if WORLD.rank == 0:
        print(f"\n{WORLD.size} ranks: ZeRO stages 1-3 vs serial, largest difference {worst:.2e}")
    parallel_assert(not failures, "\n".join(failures))


@pytest.mark.parallel(nprocs=[2])
def test_stage_3_refuses_pipeline_stages_and_a_foreign_optimizer_on_every_rank():
    config = GPTConfig(**CONFIG)
    mesh = comm.init(pp=2)
    from minitp.pipeline import PipelineGPT
    stage = PipelineGPT(config, mesh)
    with pytest.raises(ValueError, match="pipeline stages"):
        FullyShardedOptimizer(AdamW(stage.named_parameters(), lr=LR), stage, mesh)
    mesh = comm.init(dp=2)
    model, other = ParallelGPT(config, mesh), ParallelGPT(config, mesh)
    with pytest.raises(ValueError, match="exactly"):
        FullyShardedOptimizer(AdamW(other.named_parameters(), lr=LR), model, mesh)
    with pytest.raises(ValueError, match="stage 1 or 2"):
        ZeroOptimizer(AdamW(model.named_parameters(), lr=LR), mesh, stage=3)


def build(config, mesh, stage):
    """A model and optimizer on ``mesh`` (None: serial) with ZeRO ``stage`` (0: none)."""
    if mesh is None:
        model = GPT(config)
        return model, AdamW(model.named_parameters(), lr=LR)
    model = ParallelGPT(config, mesh)
    optimizer = AdamW(model.named_parameters(), lr=LR)
    if stage == 3:
        return model, FullyShardedOptimizer(optimizer, model, mesh)
    return model, ZeroOptimizer(optimizer, mesh, BUCKET_BYTES, stage=stage) if stage else optimizer


@pytest.mark.parallel(nprocs=[2, 4])
def test_a_stage_3_checkpoint_holds_serial_arrays_and_resumes_exactly_on_any_mesh_and_stage(tmp_path):
    from minitp import checkpoint
    path = WORLD.bcast(str(tmp_path / "zero3.npz"), root=0)
    config = GPTConfig(**CONFIG)
    serial_losses, serial_state, _ = serial(config)  # 3 uninterrupted steps
    tp = 2 if WORLD.size == 4 else 1
    mesh = comm.init(tp=tp, dp=WORLD.size // tp)
    model, optimizer = build(config, mesh, 3)
    before = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=MAX_NORM)[0] for step in range(2)]
    checkpoint.save(path, model, optimizer, mesh, step=2)
    saved = dict(numpy.load(path))
    parallel_assert(all(not numpy.isnan(saved[name]).any() for name in serial_state), "placeholders were saved")
    # resumed: on dp = the world with each stage, and serially; each third step equals the serial one's
    for stage, where in [(3, comm.init(dp=WORLD.size)), (1, comm.init(dp=WORLD.size)), (2, mesh), (0, None)]:
        model, optimizer = build(config, where, stage)
        first = checkpoint.load(path, model, optimizer, where)
        loss = train_step(model, optimizer, *batch_at(first), where, max_norm=MAX_NORM)[0]
        whole = getattr(optimizer, "full_parameters", None)
        with whole() if whole is not None else contextlib.nullcontext():
            state = gather_serial_state(model, where.tp) if where is not None else model.state_dict()
        error = max(float(numpy.abs(state[name] - value).max()) for name, value in serial_state.items())
        parallel_assert(first == 2 and abs(loss - serial_losses[2]) <= SAME and error <= SAME,
                        f"stage {stage} resumed on {where}: loss {loss} vs {serial_losses[2]}, parameters off by {error:.1e}")
    parallel_assert(max(abs(a - b) for a, b in zip(before, serial_losses)) <= SAME, f"{before} vs {serial_losses}")
