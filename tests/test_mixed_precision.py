"""Mixed precision's machinery (issue 24, step B): master weights (minitp.nn.master_weights) and dynamic
loss scaling (minitp.nn.loss_scale) through the one training step.

- Exact: with float64 as the "low" precision and float64 masters, a power-of-two loss scale, the step
  equals the plain float64 step to 1e-12 (it is bit for bit: widening, S·x and x/S are exact).
- Master weights matter: fp16 updates of 1e-4 on a weight of 1.0 vanish (fp16's spacing there is 2^-11);
  through fp32 masters they add up.
- The scaler works: a gradient that underflows to 0 in fp16 survives with S = 2^16; an overflow skips the
  step (no weight moves) and halves S; S doubles after growth_interval clean steps; an overflow on one
  rank (a tensor-parallel rank holds other slices of the gradient) is found on every rank."""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Tensor
from minitp.nn import GPT, SGD, AdamW, GPTConfig, Module, Parameter
from minitp.nn.loss_scale import DynamicLossScaler
from minitp.nn.master_weights import MasterWeights
from minitp.training import train_step

EXACT = 1e-12
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.1, seed=4, dtype=numpy.float64)


def batch_at(step):
    windows = numpy.random.default_rng([3, step]).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 4))
    return windows[:-1], windows[1:]


def test_the_policy_in_float64_is_the_plain_float64_step():
    runs = []
    for mixed in (False, True):
        model = GPT(GPTConfig(**CONFIG))
        optimizer = AdamW(model.named_parameters(), lr=3e-3)
        scaler = None
        if mixed:
            optimizer, scaler = MasterWeights(optimizer, numpy.float64), DynamicLossScaler(2.0 ** 10, growth_interval=2,
                                                                                           max_scale=2.0 ** 11)
        losses = [train_step(model, optimizer, *batch_at(step), max_norm=0.5, scaler=scaler)[0] for step in range(4)]
        runs.append((losses, [p.data.copy() for p in model.parameters()]))
    (plain_losses, plain), (mixed_losses, mixed) = runs
    assert numpy.max(numpy.abs(numpy.subtract(plain_losses, mixed_losses))) <= EXACT
    assert max(float(numpy.max(numpy.abs(a - b))) for a, b in zip(plain, mixed)) <= EXACT
    assert scaler.scale == 2.0 ** 11  # grown at the 2nd clean step, then held at max_scale


ZEROS = numpy.zeros((1, 1), dtype=numpy.int64)  # a batch of one, which Product ignores


class Product(Module):
    """loss = c · Σ w·x: the gradient of w is c·x, whatever w -- a gradient of a chosen size."""

    def __init__(self, x, c, dtype=numpy.float16):
        super().__init__()
        self.w = Parameter(numpy.ones(len(x), dtype=dtype))
        self.x, self.c = numpy.asarray(x, dtype=dtype), c

    def loss(self, ids, targets):
        return (self.w * Tensor(self.x)).sum() * self.c


def test_an_update_below_fp16s_resolution_is_kept_by_the_master_weights():
    """fp16 next below 1.0 is 1 - 2^-11 ≈ 0.99951: ten steps of 1e-4 round back to 1.0 each time; the
    fp32 master reaches 1 - 10·1e-4 and the fp16 copy follows it."""
    plain, kept = Product([1.0], 1.0), Product([1.0], 1.0)
    optimizers = [SGD([plain.w], lr=1e-4), MasterWeights(SGD([kept.w], lr=1e-4), numpy.float32)]
    for _ in range(10):
        for model, optimizer in zip((plain, kept), optimizers):
            optimizer.zero_grad()
            model.loss(None, None).backward()  # grad = x = 1
            optimizer.step()
    assert plain.w.data[0] == numpy.float16(1.0)
    master = optimizers[1].master[0][0]
    assert abs(master - (1 - 10 * 1e-4)) < 1e-6 and kept.w.data[0] == numpy.float16(master) < 1.0


def test_a_gradient_that_underflows_in_fp16_survives_with_the_loss_scale():
    """c·x = 1e-5 · 1e-3 = 1e-8 is below fp16's smallest subnormal 2^-24 ≈ 6e-8: 0 unscaled; scaled by
    2^15 it is ≈ 3.3e-4, and unscaled in fp32 it is 1e-8 again (within fp16's relative rounding)."""
    model = Product([1e-3] * 3, 1e-5)
    model.loss(None, None).backward()
    assert not model.w.grad.any()
    model.w.grad = None
    scaler = DynamicLossScaler(2.0 ** 15)
    (model.loss(None, None) * scaler.scale).backward()
    assert not scaler.unscale([model.w])
    assert model.w.grad.dtype == numpy.float32 and numpy.allclose(model.w.grad, 1e-8, rtol=2 ** -9)


def test_an_overflow_skips_the_step_and_halves_the_scale_and_clean_steps_grow_it():
    """c·x·S = 1·1000·2^15 > 65,504 (fp16's largest): inf; the step is skipped -- no weight, no moment
    moves -- and S halves, until S·1000 fits (S = 2^6); then growth_interval clean steps double it."""
    model = Product([1000.0] * 2, 1.0)
    optimizer = MasterWeights(AdamW(model.named_parameters(), lr=1e-3, weight_decay=0.0), numpy.float32)
    scaler = DynamicLossScaler(2.0 ** 15, growth_interval=3)
    _, norm = train_step(model, optimizer, ZEROS, ZEROS, scaler=scaler)
    assert norm == float("inf") and scaler.scale == 2.0 ** 14 and scaler.skipped == 1
    assert (model.w.data == 1).all() and optimizer.state == {} and optimizer.master["w"].tolist() == [1.0, 1.0]
    norms = [train_step(model, optimizer, ZEROS, ZEROS, scaler=scaler)[1] for _ in range(10)]
    # skipped at 2^14 .. 2^7 (8 more), clean at 2^6 (S·1000 = 64,000); the third clean step doubles S
    assert [n == float("inf") for n in norms] == [True] * 8 + [False] * 2 and scaler.scale == 2.0 ** 6, norms
    assert scaler.skipped == 9 and (model.w.data < 1).all()
    train_step(model, optimizer, ZEROS, ZEROS, scaler=scaler)
    assert scaler.scale == 2.0 ** 7


@pytest.mark.parallel(nprocs=[2])
def test_an_overflow_on_one_rank_is_found_on_every_rank():
    """Rank 0's gradient holds an inf, rank 1's does not: both must skip (else rank 1 would step alone and
    the ranks' weights would part), and neither unscales."""
    world = MPI.COMM_WORLD
    w = Parameter(numpy.ones(2, dtype=numpy.float16))
    w.grad = numpy.array([numpy.inf if world.rank == 0 else 1.0, 1.0], dtype=numpy.float16)
    found = DynamicLossScaler(2.0 ** 4).unscale([w], world=world)
    parallel_assert(found, f"rank {world.rank}: the overflow was not found")
    parallel_assert(w.grad.dtype == numpy.float16, f"rank {world.rank}: unscaled although the step is skipped")


@pytest.mark.parametrize("kwargs", [dict(scale=0), dict(growth=1), dict(backoff=1), dict(growth_interval=0)])
def test_a_scaler_that_cannot_work_is_refused(kwargs):
    with pytest.raises(ValueError, match="DynamicLossScaler needs"):
        DynamicLossScaler(**kwargs)
