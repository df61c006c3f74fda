"""Random bits that shard exactly: a counter-based hash of (seed, counter, global element index).

Why not ``numpy.random``? A stateful generator hands out numbers in the order they are asked for, so a
rank that holds rows 2..4 of a tensor cannot draw "the numbers the serial run drew for rows 2..4" without
drawing rows 0..1 first. Sequence-parallel dropout (Korthikanti et al. 2022, section 4.2.2) needs exactly
that: every rank must drop the same elements as the serial model would, or the sharded run is not the
serial run.

A counter-based generator (as in Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") makes each
random number a pure function of *where* it is used::

    bits(i) = finalise(key(seed, counter) + i * golden)       i = the element's global flat index

so any rank computes any element's bits, in any order, on numpy or CuPy alike (plain uint64 arithmetic,
which wraps modulo 2^64 identically on both). ``counter`` numbers the dropout calls of one step, so two
dropout layers (or two steps) draw different masks from one seed.

The finaliser is splitmix64's (Steele, Lea and Flood 2014): three xor-shifts and two multiplications
that turn consecutive inputs into statistically independent 64-bit outputs.
"""
import numpy

from minitp import backend, kernels
from minitp.blocks import blocks

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive indices land far apart before mixing
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _splitmix64_int(z):
    """The splitmix64 finaliser on a Python int (exact, host side): used to mix the key."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _splitmix64_in_place(z, scratch, xp):
    """The same finaliser on a uint64 array ``z`` (numpy or CuPy, at least 1-d), computed in place, with
    ``scratch`` (of z's shape) for the shifts; the multiplications wrap modulo 2^64.

    Constants are numpy uint64 scalars so that neither library tries to fit them in an int64.
    """
    for shift, multiplier in ((30, _MIX1), (27, _MIX2)):
        xp.right_shift(z, numpy.uint64(shift), out=scratch)
        z ^= scratch
        z *= numpy.uint64(multiplier)
    xp.right_shift(z, numpy.uint64(31), out=scratch)
    z ^= scratch


def stream_key(seed, counter):
    """The 64-bit key of one stream: (seed, counter) mixed so that nearby seeds or counters give
    unrelated keys (a plain seed + counter would make stream (1, 0) equal stream (0, 1))."""
    return _splitmix64_int(_splitmix64_int(int(seed)) + _GOLDEN * (int(counter) + 1))


def global_flat_index(shape, global_shape=None, offset=None, xp=None):
    """The C-order flat index, in the global tensor, of every element of a block of it (uint64).

    The block has ``shape`` inside a tensor of ``global_shape`` (by default the block is the whole
    tensor). ``offset`` says where it sits, one entry per axis: an int, the start of a contiguous run
    along that axis, or a 1-d integer array, the global position of each of the block's entries along
    it -- for a block that is not contiguous there, such as context parallelism's zigzag chunks or a
    ring-attention block of (query, key) positions. Element ``[i0, i1, ...]`` has index
    ``sum_k position_k(i_k) * stride_k`` with ``stride_k = prod(global_shape[k+1:])`` and
    ``position_k(i) = offset_k + i`` or ``offset_k[i]``.
    """
    xp = xp or backend.xp
    shape = tuple(int(n) for n in shape)
    global_shape = shape if global_shape is None else tuple(int(n) for n in global_shape)
    offset = (0,) * len(shape) if offset is None else tuple(offset)
    if not len(shape) == len(global_shape) == len(offset):
        raise ValueError(f"shape {shape}, global_shape {global_shape} and offset {offset} "
                         "must have one entry per axis")
    positions = [_positions(n, o, total, shape, global_shape) for n, o, total in zip(shape, offset, global_shape)]

    index = xp.zeros((1,) * len(shape), dtype=xp.uint64)
    stride = 1
    for axis in reversed(range(len(shape))):
        # position_k(i_k) * stride_k, shaped to broadcast along axis k only
        start, where = positions[axis]
        along = (xp.arange(shape[axis], dtype=xp.uint64) + numpy.uint64(start) if where is None
                 else xp.asarray(where, dtype=xp.uint64)) * numpy.uint64(stride)
        index = index + along.reshape((1,) * axis + (shape[axis],) + (1,) * (len(shape) - axis - 1))
        stride *= global_shape[axis]
    return index if len(shape) else index.reshape(())


def _positions(length, offset, total, shape, global_shape):
    """(start, None) for a contiguous run, (None, host positions) for explicit ones; ValueError unless
    every position lies in [0, total)."""
    if numpy.ndim(offset) == 0:
        start = int(offset)
        if start < 0 or start + length > total:
            raise ValueError(f"a block of shape {shape} at offset {start} does not fit in {global_shape}")
        return start, None
    where = numpy.asarray(backend.to_host(offset) if hasattr(offset, "__cuda_array_interface__") else offset)
    if where.shape != (length,) or where.dtype.kind not in "iu":
        raise ValueError(f"positions {where} along an axis of length {length}: one integer per entry expected")
    if length and (where.min() < 0 or where.max() >= total):
        raise ValueError(f"positions {where} do not fit in an axis of length {total} (global shape {global_shape})")
    return None, where


def _hash_into(index, key, z, scratch, xp):
    """z = splitmix64(index * golden + key): the bits of the elements at flat ``index`` (1-d uint64), in
    place in ``z`` (index's shape), ``scratch`` of the same shape for the shifts."""
    xp.multiply(index, numpy.uint64(_GOLDEN), out=z)
    z += key
    _splitmix64_in_place(z, scratch, xp)


def random_bits(shape, seed, counter, global_shape=None, offset=None, xp=None):
    """64 random bits per element (uint64), a pure function of (seed, counter, global flat index)."""
    index = global_flat_index(shape, global_shape, offset, xp)
    flat = index.reshape(-1)  # 1-d, so that a 0-d shape is an array to work in
    xp = backend.array_module(flat)
    z = xp.empty_like(flat)
    _hash_into(flat, numpy.uint64(stream_key(seed, counter)), z, xp.empty_like(flat), xp)
    return z.reshape(index.shape)


def check_probability(p):
    """``ValueError`` unless ``p`` is a dropout probability, in [0, 1): p = 1 would drop everything and
    scale the survivors by 1/(1 - p), an infinity."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def keep_mask(shape, p, seed, counter, global_shape=None, offset=None, xp=None):
    """Dropout's keep mask (bool array of ``shape``): True where the element survives.

    Each element is dropped with probability ``p``: kept iff the top 32 bits of its hash are at least
    ``round(p * 2^32)``. A block at ``offset`` in ``global_shape`` gets exactly its slice of the mask of
    the whole tensor, on numpy and CuPy alike.
    """
    check_probability(p)
    threshold = numpy.uint64(round(p * 2 ** 32))
    index = global_flat_index(shape, global_shape, offset, xp).reshape(-1)  # a 0-d shape: one element
    xp = backend.array_module(index)
    key = numpy.uint64(stream_key(seed, counter))
    if kernels.enabled(index):  # on a GPU: the hash and the threshold below in one pass (minitp.kernels)
        from minitp.kernels.elementwise import keep_mask as fused
        return fused(index, key, threshold).reshape(tuple(shape))
    keep = xp.empty(index.shape, dtype=bool)
    parts = blocks(index.size, xp)
    z, scratch = xp.empty_like(index[parts[0]]), xp.empty_like(index[parts[0]])
    # random_bits, then the threshold, a block at a time: the hash's nine passes over 8-byte integers
    # stay in the L2 cache (minitp.blocks), in two block-sized buffers -- the same bits, so the same mask
    for part in parts:
        z_, scratch_ = z[:part.stop - part.start], scratch[:part.stop - part.start]
        _hash_into(index[part], key, z_, scratch_, xp)
        z_ >>= numpy.uint64(32)
        xp.greater_equal(z_, threshold, out=keep[part])
    return keep.reshape(tuple(shape))
