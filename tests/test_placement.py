"""minitp.nn.placement: where a rank's block sits (contiguous blocks, context parallelism's zigzag, nested
splits on one axis), and the dropout masks and random bits drawn at those places equal the serial ones."""
import numpy
import pytest

from minitp import Tensor, no_grad, rng
from minitp import nn
from minitp.nn import placement


def test_zigzag_gives_rank_r_chunks_r_and_its_mirror():
    # 16 tokens, cp = 4: 8 chunks of 2; rank 0 holds chunks 0 and 7, rank 3 chunks 3 and 4
    assert placement.runs(0, 4, 16, "zigzag") == [(0, 2), (14, 16)]
    assert placement.runs(3, 4, 16, "zigzag") == [(6, 8), (8, 10)]
    assert placement.runs(1, 4, 16) == [(4, 8)]
    for layout in placement.LAYOUTS:
        held = numpy.concatenate([placement.positions([(r, 4, layout)], 4)[1] for r in range(4)])
        assert sorted(held) == list(range(16)), f"{layout}: every token on exactly one rank"


@pytest.mark.parametrize("layout, total, parts", [("zigzag", 12, 4), ("contiguous", 10, 4), ("zigzag", 6, 2)])
def test_lengths_that_do_not_split_are_refused(layout, total, parts):
    with pytest.raises(ValueError, match=f"cannot be cut into .*divisible by {parts * (2 if layout == 'zigzag' else 1)}"):
        placement.runs(0, parts, total, layout)


def test_nested_entries_place_a_tp_block_inside_a_cp_rank_tokens():
    cp_positions = placement.positions([(1, 2, "zigzag")], 8)[1]  # 16 tokens: chunks 1 and 2 of 4 -> 4..11
    assert list(cp_positions) == list(range(4, 12))
    cp_positions = placement.positions([(0, 2, "zigzag")], 8)[1]  # chunks 0 and 3 -> 0..3, 12..15
    total, tp_block = placement.positions([(0, 2, "zigzag"), (1, 2)], 4)  # its second half: tp rank 1 of 2
    assert total == 16 and list(tp_block) == list(cp_positions[4:]) == [12, 13, 14, 15]
    _, straddles = placement.positions([(0, 2, "zigzag"), (1, 4)], 2)  # tp = 4: blocks of 2 tokens
    assert list(straddles) == [2, 3]


def test_locate_says_start_for_one_run_and_positions_for_two():
    global_shape, offset = placement.locate(((0, 1, 4), (1, 1, 2)), (3, 2, 5))
    assert global_shape == [12, 4, 5] and offset == [3, 2, 0]
    global_shape, offset = placement.locate(((0, 1, 2, "zigzag"),), (4, 2))
    assert global_shape == [8, 2] and offset == [2, 0]  # the middle rank's two chunks touch: one run, 2..5
    global_shape, offset = placement.locate(((0, 0, 2, "zigzag"),), (4, 2))
    assert list(offset[0]) == [0, 1, 6, 7]


def test_keep_mask_at_positions_is_the_serial_mask_there():
    full = rng.keep_mask((2, 3, 8, 8), 0.3, seed=4, counter=2, xp=numpy)
    queries, keys = numpy.array([0, 1, 6, 7]), numpy.array([2, 3, 4, 5])
    block = rng.keep_mask((2, 1, 4, 4), 0.3, 4, 2, global_shape=(2, 3, 8, 8), offset=(0, 1, queries, keys), xp=numpy)
    assert numpy.array_equal(block, full[:, 1:2][:, :, queries][:, :, :, keys])
    with pytest.raises(ValueError, match="do not fit"):
        rng.keep_mask((4,), 0.3, 4, 2, global_shape=(8,), offset=(numpy.array([0, 1, 2, 8]),), xp=numpy)


@pytest.mark.parametrize("splits", [((0, 1, 2, "zigzag"),), ((0, 0, 2, "zigzag"), (0, 1, 2), (1, 1, 2))])
def test_dropout_on_a_zigzag_block_drops_what_the_serial_dropout_drops_there(splits):
    x = numpy.ones((16, 4, 3))
    with no_grad():
        serial = nn.Dropout(0.5, seed=9)(Tensor(x)).data
        _, rows = placement.positions([s[1:] for s in splits if s[0] == 0], 16 // numpy.prod([s[2] for s in splits if s[0] == 0]))
        columns = slice(2, 4) if any(s[0] == 1 for s in splits) else slice(None)
        block = nn.Dropout(0.5, seed=9, splits=splits)(Tensor(x[rows][:, columns])).data
    assert numpy.array_equal(block, serial[rows][:, columns])
