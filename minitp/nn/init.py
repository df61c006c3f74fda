"""Where the first weights come from: a pure function of (seed, parameter name, global index), so any
rank draws exactly its own block of any parameter and never the whole tensor.

Why not ``numpy.random``? A stateful generator hands numbers out in order: the rank holding columns
[r·n/t, (r+1)·n/t) of a weight could only get "the numbers the serial model drew there" by drawing the
whole weight first -- every rank would build the full model to keep its slice. Instead each value is
computed from where it sits, with the counter-based hash that dropout uses (``minitp.rng``)::

    bits(i) = splitmix64(key(seed_of(name), 0) + i * golden)      i = the global flat index

and a block of a tensor is the same hash evaluated at the block's global indices. A sharded model
therefore starts identical to the serial model built with the same seed, with no loading step, and its
construction holds 1/t of the model.

**The distribution transforms** (all on the host, in float64, then cast: a CPU and a GPU run start
from bit-identical weights; rounding to float32 happens once, at the end):

- uniform on [-bound, bound): the top 53 bits of the hash, u = bits / 2^64 in [0, 1) with a float64's
  full precision, then bound · (2u − 1);
- normal N(0, std²) by Box–Muller on one hash: the top 32 bits give u₁ in (0, 1], the low 32 bits u₂ in
  [0, 1), and z = sqrt(−2 ln u₁) · cos(2π u₂) is standard normal (the product of two independent
  uniforms' transforms; the sine partner is not used, so each element costs one hash). 32-bit u₁
  truncates the tail at |z| ≤ sqrt(2 · 32 ln 2) ≈ 6.66: the probability lost is about 3e-11.

**Names.** Seeds are derived by name down the module tree (``derive_seed(seed, "blocks.0")``, then
``"attention"``, ``"qkv"``, ``"weight"``), so a parameter's values depend on its place in the model, not
on how many numbers the layers before it happened to draw.
"""
import math
import zlib

import numpy

from minitp import backend, rng
from minitp.nn.module import Parameter


def derive_seed(seed, name):
    """A seed for the part of a model called ``name`` (e.g. ``"attention"``), a pure function of both.

    Two names give unrelated seeds; the same (seed, name) always gives the same one.
    """
    return int(numpy.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
               .generate_state(1)[0])


def block(global_shape, axis=None, index=0, parts=1):
    """(shape, offset) of block ``index`` of ``parts`` equal blocks of ``global_shape`` along ``axis``
    (``axis=None``: the whole tensor). The callers have checked that ``parts`` divides that axis."""
    global_shape = tuple(int(n) for n in global_shape)
    if axis is None or parts == 1:
        return global_shape, (0,) * len(global_shape)
    size = global_shape[axis] // parts
    shape = global_shape[:axis] + (size,) + global_shape[axis + 1:]
    offset = tuple(index * size if k == axis else 0 for k in range(len(global_shape)))
    return shape, offset


CHUNK = 1 << 15
"""Elements drawn at a time: the uint64 hashes and float64 terms of a chunk are its only temporaries
(about 1 MiB), so building a layer peaks at little more than the layer itself."""


def _draw(global_shape, seed, dtype, axis, index, parts, transform):
    """Block ``index`` of ``parts`` along ``axis`` of the tensor whose elements are ``transform(bits)``,
    computed chunk by chunk of rows (the first axis) on the host, then moved to the device."""
    backend.check_dtype(dtype)
    shape, offset = block(global_shape, axis, index, parts)
    out = numpy.empty(shape, dtype=dtype)
    if out.size:
        rows = max(1, CHUNK // max(1, out[0].size)) if out.ndim else 1
        for start in range(0, shape[0] if out.ndim else 1, rows):
            piece = out[start:start + rows] if out.ndim else out
            corner = (offset[0] + start,) + offset[1:] if out.ndim else offset
            piece[...] = transform(rng.random_bits(piece.shape, seed, 0, global_shape, corner, xp=numpy))
    return backend.from_host(out)


def uniform(global_shape, bound, seed, dtype, axis=None, index=0, parts=1):
    """Block ``index`` of ``parts`` along ``axis`` of a U(−bound, bound) tensor of ``global_shape``."""
    def transform(bits):
        unit = (bits >> numpy.uint64(11)) * 2.0 ** -53  # [0, 1) with a float64's 53 bits
        return bound * (2 * unit - 1)
    return _draw(global_shape, seed, dtype, axis, index, parts, transform)


def normal(global_shape, std, seed, dtype, axis=None, index=0, parts=1):
    """Block ``index`` of ``parts`` along ``axis`` of an N(0, std²) tensor of ``global_shape``
    (Box–Muller on each element's hash; see the module docstring)."""
    def transform(bits):
        u1 = ((bits >> numpy.uint64(32)) + numpy.uint64(1)) * 2.0 ** -32  # (0, 1]: the log never sees 0
        u2 = (bits & numpy.uint64(0xFFFFFFFF)) * 2.0 ** -32  # [0, 1)
        return std * numpy.sqrt(-2 * numpy.log(u1)) * numpy.cos(2 * math.pi * u2)
    return _draw(global_shape, seed, dtype, axis, index, parts, transform)


def zeros(shape, dtype):
    backend.check_dtype(dtype)
    return backend.xp.zeros(shape, dtype=dtype)


def ones(shape, dtype):
    backend.check_dtype(dtype)
    return backend.xp.ones(shape, dtype=dtype)


def parameter(data, split_axis=None):
    """A Parameter that says which axis of the serial tensor it is a block of (``None``: all of it,
    replicated). ``minitp.parallel.tensor.shard`` and checkpoints read ``split_axis`` to gather blocks back."""
    result = Parameter(data)
    result.split_axis = split_axis
    return result
