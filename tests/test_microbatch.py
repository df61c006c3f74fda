"""One step as m microbatches is the same step (minitp.nn.microbatch), on one process, float64, dropout on.

- a GPT's loss and every gradient from m microbatches (each loss scaled by 1/m, gradients accumulated)
  equal the whole batch's, for m = 1, 2, 4: the m dropout calls draw the m blocks of the one call's
  mask, and every counter ends one step on, where the whole-batch step leaves it;
- the same through a block with full recomputation, whose re-runs (in backward, after every
  microbatch's forward) replay the microbatch they drew;
- nested splits of one axis (data parallel outside, microbatch inside) address the right block;
- bad counts and batches that do not divide are refused.
"""
import numpy
import pytest

from minitp.autograd import Tensor
from minitp.nn import GPT, Dropout, GPTConfig, TransformerBlock
from minitp.nn.microbatch import microbatch, microbatch_of, microbatch_size
from minitp.testing import max_error

SAME = 1e-12
CONFIG = GPTConfig(vocab=16, seq_len=6, hidden=8, heads=2, layers=2, dropout=0.3, seed=4, dtype="float64")


def batch(seed=0, shape=(6, 4)):
    windows = numpy.random.default_rng(seed).integers(0, CONFIG.vocab, (shape[0] + 1, shape[1]))
    return windows[:-1], windows[1:]


def counters(model):
    return [m.counter for m in model.modules() if isinstance(m, Dropout)]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_microbatches_accumulate_the_whole_batch_gradient(count):
    ids, targets = batch()
    whole = GPT(CONFIG)
    for _ in range(2):  # two steps: the second draws with counter 1 in both runs
        whole.zero_grad()
        loss = whole.loss(ids, targets)
        loss.backward()
    pieces = GPT(CONFIG)
    for _ in range(2):
        pieces.zero_grad()
        total = 0.0
        for index in range(count):
            with microbatch(pieces, index, count):
                part = pieces.loss(microbatch_of(ids, index, count), microbatch_of(targets, index, count))
            part.backward(numpy.full((), 1.0 / count))  # the mean over the batch: 1/m of each block's mean
            total += part.item() / count
    assert abs(total - loss.item()) <= SAME
    expected = dict(whole.named_parameters())
    for name, p in pieces.named_parameters():
        assert max_error(p.grad, expected[name].grad) <= SAME, name
    assert counters(pieces) == counters(whole) == [2] * len(counters(whole))
    assert all(m.microbatch == (0, 1) for m in pieces.modules() if isinstance(m, Dropout)), "restored on exit"


def test_full_recompute_replays_the_microbatch_each_re_run_drew():
    x = numpy.random.default_rng(1).standard_normal((5, 4, 8))
    upstream = numpy.random.default_rng(2).standard_normal((5, 4, 8))
    plain = TransformerBlock(8, 2, dropout=0.3, attention_dropout=0.4, seed=7, dtype=numpy.float64)
    y = plain(Tensor(x))
    y.backward(upstream)
    recomputed = TransformerBlock(8, 2, dropout=0.3, attention_dropout=0.4, seed=7, dtype=numpy.float64,
                                  recompute="full")
    outputs = []
    for index in range(2):  # both forwards first, then both backwards: the re-runs happen outside the block
        with microbatch(recomputed, index, 2):
            outputs.append(recomputed(Tensor(microbatch_of(x, index, 2))))
    for index, out in enumerate(outputs):
        out.backward(microbatch_of(upstream, index, 2))
    assert max_error(numpy.concatenate([o.data for o in outputs], axis=1), y.data) <= SAME
    expected = dict(plain.named_parameters())
    for name, p in recomputed.named_parameters():
        assert max_error(p.grad, expected[name].grad) <= SAME, name
    assert counters(recomputed) == counters(plain)


def test_nested_splits_of_one_axis_address_the_inner_block():
    ones = numpy.ones((3, 8, 4))
    whole = Dropout(0.5, seed=9, batch_axis=1)(Tensor(ones)).data
    # replica 1 of 2 holds columns 4..7; its microbatch 1 of 2 is columns 6..7
    inner = Dropout(0.5, seed=9, splits=((1, 1, 2),), batch_axis=1)
    inner.microbatch = (1, 2)
    assert numpy.array_equal(inner(Tensor(ones[:, 6:8])).data, whole[:, 6:8])


def test_bad_microbatch_counts_are_refused():
    with pytest.raises(ValueError, match="positive integer"):
        microbatch_size(4, 0)
    with pytest.raises(ValueError, match="not divisible by 3 microbatches"):
        microbatch_size(4, 3)
    dropout = Dropout(0.5)  # no batch axis
    dropout.microbatch = (0, 2)
    with pytest.raises(ValueError, match="batch_axis"):
        dropout(Tensor(numpy.ones((2, 2))))
