"""Initial weights that shard exactly (minitp.nn.init): every value a pure function of (seed, name, global
index), so a rank draws its block directly, the sharded model starts bit for bit where the serial one does,
and building a tensor-parallel model costs a rank about 1/t of the serial model's memory.

- the transforms: uniform and Box–Muller normal have the moments they claim (within a few standard errors
  of 200,000 draws), and the normal's tail stops where the docstring says;
- a block drawn alone is bit for bit that block of the whole tensor, for every split axis and part count;
- fresh tensor-parallel layers and a fresh ParallelGPT equal the serial ones built from the same seed,
  with no loading, on 1 to 4 ranks;
- peak memory while building a GPT at tp = 4 is at most 0.35 of the serial build's (tracemalloc, per rank).
"""
import math
import tracemalloc

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.nn import GPT, Embedding, GPTConfig, Linear, init
from minitp.parallel import ColumnParallelLinear, ParallelGPT, RowParallelLinear, VocabParallelEmbedding
from minitp.parallel.tensor.shard import gather_serial_state

WORLD = MPI.COMM_WORLD
DRAWS = 200_000


def test_normal_has_the_moments_of_n_0_std2():
    std = 0.7
    z = init.normal((DRAWS,), std, seed=123, dtype=numpy.float64) / std
    # standard errors of the sample mean, variance and kurtosis of N(0, 1): 1/√n, √(2/n), √(24/n)
    assert abs(z.mean()) < 5 / math.sqrt(DRAWS)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / DRAWS)
    assert abs((z ** 4).mean() / z.var() ** 2 - 3) < 5 * math.sqrt(24 / DRAWS)
    assert abs((z ** 3).mean()) < 5 * math.sqrt(15 / DRAWS)  # skewness 0 (Var z³ = 15)
    assert abs((z > 1).mean() - 0.158655) < 5 * math.sqrt(0.16 * 0.84 / DRAWS)  # P(z > 1): the shape too
    assert abs(z).max() <= math.sqrt(2 * 32 * math.log(2))  # the 32-bit u1 bounds the tail at ~6.66


def test_uniform_has_the_moments_of_u_minus_bound_bound():
    bound = 0.3
    u = init.uniform((DRAWS,), bound, seed=7, dtype=numpy.float64)
    assert u.min() >= -bound and u.max() < bound
    assert abs(u.mean()) < 5 * bound / math.sqrt(3 * DRAWS)
    assert abs(u.var() / (bound ** 2 / 3) - 1) < 5 * math.sqrt(0.8 / DRAWS)  # Var(u²)/Var(u)² = 4/5 for U(-1, 1)
    histogram, _ = numpy.histogram(u, bins=10, range=(-bound, bound))
    assert abs(histogram / DRAWS - 0.1).max() < 5 * math.sqrt(0.09 / DRAWS)  # flat


def test_seeds_and_names_give_different_values_and_the_same_seed_the_same():
    a = init.normal((50,), 1.0, seed=1, dtype=numpy.float64)
    assert numpy.array_equal(a, init.normal((50,), 1.0, seed=1, dtype=numpy.float64))
    assert not numpy.allclose(a, init.normal((50,), 1.0, seed=2, dtype=numpy.float64))
    first, second = (init.derive_seed(5, name) for name in ("blocks.0", "blocks.1"))
    assert first != second and init.derive_seed(5, "blocks.0") == first
    # float32 is float64 rounded once: the same numbers in any dtype
    assert numpy.array_equal(init.normal((50,), 1.0, 1, numpy.float32), a.astype(numpy.float32))


@pytest.mark.parametrize("draw", [init.normal, init.uniform])
@pytest.mark.parametrize("shape", [(12, 6), (6, 12, 3)])
def test_a_block_drawn_alone_is_that_block_of_the_whole(draw, shape):
    whole = draw(shape, 0.5, 99, numpy.float64)
    for axis in range(len(shape)):
        for parts in (1, 2, 3, 6):
            size = shape[axis] // parts
            for index in range(parts):
                block = draw(shape, 0.5, 99, numpy.float64, axis=axis, index=index, parts=parts)
                expected = numpy.take(whole, range(index * size, (index + 1) * size), axis=axis)
                assert numpy.array_equal(block, expected), (axis, parts, index)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_fresh_parallel_layers_are_the_serial_layers_cut():
    """Built from the same seed, no loading: each rank's parameters are exactly its block of the serial ones."""
    tp = comm.init(tp=WORLD.size).tp
    t, f64 = tp.size, numpy.float64
    pairs = [(Linear(5, 6 * t, dtype=f64, seed=3), ColumnParallelLinear(5, 6 * t, dtype=f64, seed=3, group=tp)),
             (Linear(6 * t, 5, dtype=f64, seed=4), RowParallelLinear(6 * t, 5, dtype=f64, seed=4, group=tp)),
             (Linear(5, 3 * t, dtype=f64, seed=5, std=0.02),
              ColumnParallelLinear(5, 3 * t, dtype=f64, seed=5, std=0.02, group=tp)),
             (Embedding(4 * t, 3, dtype=f64, seed=6), VocabParallelEmbedding(4 * t, 3, dtype=f64, seed=6, group=tp))]
    for serial, sharded in pairs:
        gathered = gather_serial_state(sharded, tp)
        for name, array in serial.state_dict().items():
            parallel_assert(numpy.array_equal(gathered[name], array), f"{type(sharded).__name__}.{name}")


CONSTRUCTION = GPTConfig(vocab=2048, seq_len=16, hidden=256, heads=4, layers=2, dtype="float64")


def peak_bytes(build):
    """Peak bytes Python and numpy allocate while ``build()`` runs (tracemalloc; numpy reports its arrays)."""
    tracemalloc.start()
    model = build()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, model


@pytest.mark.parallel(nprocs=[4])
def test_building_a_gpt_at_tp_4_takes_at_most_035_of_the_serial_build():
    mesh = comm.init(tp=4)
    parallel_peak, model = peak_bytes(lambda: ParallelGPT(CONSTRUCTION, mesh))
    serial_peak, serial = peak_bytes(lambda: GPT(CONSTRUCTION))
    parallel_assert(parallel_peak <= 0.35 * serial_peak,
                    f"building at tp=4 peaked at {parallel_peak:,} B, {parallel_peak / serial_peak:.3f} of the "
                    f"serial build's {serial_peak:,} B")
    # and what it built is the serial model's start, cut
    gathered, expected = gather_serial_state(model, mesh.tp), serial.state_dict()
    parallel_assert(all(numpy.array_equal(gathered[name], expected[name]) for name in expected))
