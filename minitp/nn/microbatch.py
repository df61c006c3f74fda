"""How does one training step run as m microbatches and stay the same step?

The batch axis is cut into m equal blocks (ids and targets are (s, B): block μ is columns
[μ·B/m, (μ+1)·B/m)), each block runs forward and backward on its own, and the parameter gradients add
up in ``.grad``. Two things make the sum the gradient of the whole batch:

- **the loss**: the mean over the B columns is the mean of the m blocks' means (equal blocks), so each
  block's loss is scaled by 1/m before its backward;
- **the dropout masks**: the serial step calls each dropout once, on the whole batch. Inside
  ``microbatch(module, μ, m)`` every dropout of ``module`` draws block μ of that one call's mask, and
  the step's counter moves on only after block m-1 (``nn.Dropout``). Run the blocks in order, and the
  m calls drop exactly the elements the one call drops.

Gradient accumulation uses this on one process; the pipeline schedules (``minitp.pipeline``) use it
for every microbatch a stage runs.
"""
import contextlib

from minitp.nn.layers import Dropout


def microbatch_size(batch, count, what="the batch"):
    """B / m, or a ``ValueError`` (on every rank alike) when m does not divide B or m < 1."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of microbatches must be a positive integer, not {count!r}")
    if batch % count:
        raise ValueError(f"{what}={batch} is not divisible by {count} microbatches: choose sizes where it divides")
    return batch // count


def microbatch_of(array, index, count, axis=1):
    """Block ``index`` of ``count`` equal blocks of ``array`` along ``axis`` (ids and targets (s, B):
    axis 1): a view, no copy."""
    size = microbatch_size(array.shape[axis], count)
    where = [slice(None)] * array.ndim
    where[axis] = slice(index * size, (index + 1) * size)
    return array[tuple(where)]


@contextlib.contextmanager
def microbatch(module, index, count):
    """Run ``module`` on microbatch ``index`` of ``count``: each of its dropouts draws that block of the
    step's mask (along its own batch axis). The previous setting is restored on exit."""
    dropouts = [m for m in module.modules() if isinstance(m, Dropout)]
    before = [d.microbatch for d in dropouts]
    for dropout in dropouts:
        dropout.microbatch = (index, count)
    try:
        yield
    finally:
        for dropout, previous in zip(dropouts, before):
            dropout.microbatch = previous
