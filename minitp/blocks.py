"""Why do GeLU, softmax, AdamW and dropout's mask walk their arrays a block at a time?

Each of them is several elementwise passes (GeLU's forward eight: a square, three scalings, a tanh,
...). Over a whole activation -- the MLP's (s, b, ffn) is 8 MiB in float32 at b=4, s=256, ffn=2048 --
every pass streams the array from and back to memory. Over blocks of 32K elements (128 KiB in float32)
every pass after the first reads what the one before left in the core's L2 cache, and the scratch
buffers are block-sized, so no temporary of the activation's size is allocated. (Dropout's mask is a
dozen passes of 64-bit integer hashing per element: ``rng.keep_mask``.) The ops compute the
same values either way: a block is a slice of the array, and every formula is elementwise or per row.
(LayerNorm's (s, b, h), 2 MiB here, stays in the last-level cache whole; blocks of its rows measured no
faster than in-place passes over the whole, so it has none.)

On a GPU there is no such cache to fill, and each block would cost another kernel launch per pass: a
CuPy array is one block.
"""
import numpy

BLOCK = 1 << 15
"""Elements per block: an op's three or four float32 buffers of this size fit in a core's 512 KiB L2."""


def blocks(size, xp):
    """Slices covering ``range(size)`` in order, ``BLOCK`` elements each (the last one shorter); one
    slice for CuPy, and one empty slice for size 0 (so an op still has a first block to size its scratch)."""
    step = BLOCK if xp is numpy else max(size, 1)
    return [slice(start, min(start + step, size)) for start in range(0, max(size, 1), step)]


def row_blocks(rows, length, xp):
    """Slices of ``range(rows)``, whole rows of ``length`` elements, about ``BLOCK`` elements each (at
    least one row); one slice for CuPy."""
    step = max(BLOCK // max(length, 1), 1) if xp is numpy else max(rows, 1)
    return [slice(start, min(start + step, rows)) for start in range(0, max(rows, 1), step)]
