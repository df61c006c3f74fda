"""Loss scaling through a pipeline (issue 24): ``Pipelined(schedule, m)(..., scale=S)`` seeds the last
stage's backward with S/m instead of 1/m (minitp.pipeline.engine), so every gradient is S times larger
and the loss stays unscaled; with pp = 1 it is gradient accumulation, through the same path.

- The seed is scaled: float64, a power-of-two S, gradients after backward with ``scale=S`` are exactly
  (bit for bit) S times those without, on every stage; the losses are equal.
- Exact: float64 as the "low" and the master dtype, a power-of-two S, a pipelined ``train_step`` with
  ``MasterWeights`` and a ``DynamicLossScaler`` equals the plain float64 step to 1e-12.
- fp16 runs: an fp16 ``PipelineGPT`` trains through ``train_step`` with the scaler.
- An S/m that the model's dtype cannot hold as a normal number is refused on every rank before any send.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.nn import AdamW, GPTConfig
from minitp.nn.loss_scale import DynamicLossScaler
from minitp.nn.master_weights import MasterWeights
from minitp.pipeline import PipelineGPT, forward_backward
from minitp.pipeline.engine import check_scale
from minitp.training import Pipelined, train_step
from parallel_helpers import value_error

WORLD = MPI.COMM_WORLD
EXACT = 1e-12
CONFIG = dict(vocab=16, seq_len=4, hidden=8, heads=2, layers=4, dropout=0.1, seed=3, dtype="float64")
BATCH = 4


def batch_at(step):
    windows = numpy.random.default_rng([5, step]).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, BATCH))
    return windows[:-1], windows[1:]


def meshes():
    """(dp, pp): a pipeline of 2 stages where the world allows, and pp = 1 (gradient accumulation)."""
    return [(1, 2), (2, 1)] if WORLD.size == 2 else [(1, 1)]


@pytest.mark.parallel(nprocs=[1, 2])
@pytest.mark.parametrize("schedule", ["afab", "1f1b"])
def test_the_scaled_seed_makes_every_gradient_exactly_s_times_larger(schedule):
    """float64 and S = 2^10: S/m and S·g are exact, so scaled == S · unscaled to the last bit."""
    ids, targets = batch_at(0)
    scale, m = 2.0 ** 10, 2
    for dp, pp in meshes():
        mesh = comm.init(dp=dp, pp=pp)
        runs = []
        for s in (None, scale):
            model = PipelineGPT(GPTConfig(**CONFIG), mesh)  # the same weights and dropout masks each time
            run = forward_backward(model, ids, targets, mesh, schedule, m, scale=s)
            runs.append((run.loss, {name: p.grad.copy() for name, p in model.named_parameters()}))
        (plain_loss, plain), (scaled_loss, scaled) = runs
        where = f"dp {dp} pp {pp}, {schedule}"
        parallel_assert(plain_loss == scaled_loss, f"{where}: the loss is scaled: {scaled_loss} vs {plain_loss}")
        parallel_assert(set(plain) == set(scaled) and len(plain) > 0, f"{where}: the same parameters")
        off = [name for name in plain if not numpy.array_equal(scaled[name], scale * plain[name])]
        parallel_assert(not off, f"{where}: not exactly S times larger: {off}")
        moved = all(numpy.abs(g).max() > 0 for g in plain.values())
        parallel_assert(moved, f"{where}: some gradient is zero, the comparison is empty")


def run_steps(mesh, mixed, schedule, m, steps=4):
    model = PipelineGPT(GPTConfig(**CONFIG), mesh)
    optimizer, scaler = AdamW(model.named_parameters(), lr=3e-3), None
    if mixed:
        optimizer = MasterWeights(optimizer, numpy.float64)
        scaler = DynamicLossScaler(2.0 ** 10, growth_interval=2, max_scale=2.0 ** 11)
    losses = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=0.5, scaler=scaler,
                         forward_backward=Pipelined(schedule, m))[0] for step in range(steps)]
    return losses, {name: p.data.copy() for name, p in model.named_parameters()}, scaler


@pytest.mark.parallel(nprocs=[1, 2])
@pytest.mark.parametrize("schedule", ["afab", "1f1b"])
def test_a_pipelined_step_with_the_scaler_in_float64_is_the_plain_step(schedule):
    for dp, pp in meshes():
        mesh = comm.init(dp=dp, pp=pp)
        plain_losses, plain, _ = run_steps(mesh, False, schedule, 2)
        mixed_losses, mixed, scaler = run_steps(mesh, True, schedule, 2)
        where = f"dp {dp} pp {pp}, m 2, {schedule}"
        worst = max(abs(a - b) for a, b in zip(plain_losses, mixed_losses))
        parallel_assert(worst <= EXACT, f"{where}: losses {mixed_losses} vs {plain_losses}")
        worst = max(float(numpy.max(numpy.abs(plain[name] - mixed[name]))) for name in plain)
        parallel_assert(worst <= EXACT, f"{where}: weights differ by {worst:.1e}")
        parallel_assert(scaler.scale == 2.0 ** 11 and scaler.skipped == 0, f"{where}: scale {scaler.scale}")
        parallel_assert(len(set(plain_losses)) == 4, f"{where}: the losses move: {plain_losses}")


@pytest.mark.parallel(nprocs=[2])
def test_an_fp16_pipeline_trains_with_master_weights_and_the_scaler():
    """pp = 2, fp16 stages, fp32 masters, S from 2^15 with m = 2 (seed 2^14): every step's loss finite
    and the same on both stages, the weights fp16 and moving, the masters fp32."""
    mesh = comm.init(pp=2)
    model = PipelineGPT(GPTConfig(**{**CONFIG, "dtype": "float16"}), mesh)
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    optimizer = MasterWeights(AdamW(model.named_parameters(), lr=1e-2), numpy.float32)
    scaler = DynamicLossScaler(2.0 ** 15, growth_interval=3)
    results = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=1.0, scaler=scaler,
                          forward_backward=Pipelined("1f1b", 2)) for step in range(8)]
    losses = [loss for loss, _ in results]
    stepped = sum(numpy.isfinite(norm) for _, norm in results)
    parallel_assert(all(numpy.isfinite(losses)), f"losses {losses}")
    parallel_assert(mesh.pp.comm.allgather(losses)[0] == losses, "the stages report the same losses")
    parallel_assert(stepped >= 4 and stepped + scaler.skipped == 8, f"{stepped} steps taken, {scaler.skipped} skipped")
    parallel_assert(all(p.dtype == numpy.float16 for p in model.parameters()), "the model stays fp16")
    masters = optimizer.master
    parallel_assert(all(a.dtype == numpy.float32 for a in masters.values()) and len(masters) == len(before),
                    "fp32 masters for every parameter")
    moved = sum(not numpy.array_equal(before[name], p.data) for name, p in model.named_parameters())
    parallel_assert(moved == len(before), f"only {moved} of {len(before)} parameters moved")


def test_a_seed_the_dtype_cannot_hold_is_refused():
    check_scale(None, 3, "float16")
    check_scale(2.0 ** 15, 2, "float16")  # 2^14: fine
    check_scale(2.0 ** 17, 4, "float32")  # fp32 holds it
    with pytest.raises(ValueError, match="cannot hold as a normal number"):
        check_scale(2.0 ** 17, 1, "float16")  # 131,072 > 65,504: the seed would be inf
    with pytest.raises(ValueError, match="cannot hold as a normal number"):
        check_scale(2.0 ** -12, 8, "float16")  # 2^-15, below fp16's smallest normal 2^-14
    with pytest.raises(ValueError, match="cannot hold as a normal number"):
        check_scale(float("inf"), 1, "float64")


@pytest.mark.parallel(nprocs=[2])
def test_an_unholdable_seed_is_refused_on_every_rank_before_any_send():
    mesh = comm.init(pp=2)
    model = PipelineGPT(GPTConfig(**{**CONFIG, "dtype": "float16"}), mesh)
    ids, targets = batch_at(0)
    error, sent = value_error(lambda: forward_backward(model, ids, targets, mesh, "1f1b", 1, scale=2.0 ** 17))
    parallel_assert(error is not None and "cannot hold as a normal number" in error, f"rank {WORLD.rank}: {error}")
    parallel_assert(sent == 0, f"rank {WORLD.rank}: {sent} collectives before the refusal")
