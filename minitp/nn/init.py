"""Where the first weights come from: drawn on the host with numpy, from a seed, then moved to the device.

Drawing on the host (never with ``cupy.random``) makes a CPU run and a GPU run start from bit-identical
weights, and a sharded model can cut its shard out of exactly the weights the serial model would have.

Seeds are derived by name (``derive_seed(seed, "mlp")``) rather than drawn one after another, so a
sublayer's weights and dropout stream depend on its place in the model, not on how many numbers the layers
before it happened to draw.
"""
import zlib

import numpy

from minitp import backend


def rng_from(seed=0, rng=None):
    """The generator to draw from: ``rng`` when given, else a fresh one seeded with ``seed``."""
    return rng if rng is not None else numpy.random.default_rng(seed)


def derive_seed(seed, name):
    """A seed for the part of a model called ``name`` (e.g. ``"attention"``), a pure function of both.

    Two names give unrelated seeds; the same (seed, name) always gives the same one.
    """
    return int(numpy.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
               .generate_state(1)[0])


def normal(shape, std, rng, dtype):
    """N(0, std^2) entries, drawn in float64 on the host then cast (the same numbers in any dtype)."""
    return backend.from_host((std * rng.standard_normal(shape)).astype(dtype))


def uniform(shape, bound, rng, dtype):
    """U(-bound, bound) entries, drawn on the host."""
    return backend.from_host(rng.uniform(-bound, bound, shape).astype(dtype))


def zeros(shape, dtype):
    return backend.xp.zeros(shape, dtype=dtype)


def ones(shape, dtype):
    return backend.xp.ones(shape, dtype=dtype)
