"""The learning-rate schedule (minitp.nn.schedule) against its formula written out by hand."""
import math

import pytest

from minitp.nn.schedule import check_schedule, warmup_cosine

LR, FLOOR, WARMUP, TOTAL = 3e-3, 3e-4, 10, 111  # 100 decayed steps after the warmup: t = 10 .. 110


def test_the_warmup_ramps_linearly_from_lr_over_warmup_to_lr():
    assert [warmup_cosine(t, LR, FLOOR, WARMUP, TOTAL) for t in (0, 4, 9)] == pytest.approx(
        [3e-3 * 1 / 10, 3e-3 * 5 / 10, 3e-3], rel=1e-15)


def test_the_decay_starts_at_lr_passes_the_mean_at_its_midpoint_and_ends_on_the_floor():
    # t = 10: cos(0) = 1 -> lr; t = 60: half of the 100 decayed steps, cos(π/2) = 0 -> (lr + floor) / 2;
    # t = 110, the last step: cos(π) = -1 -> the floor; t = 35: a quarter, cos(π/4) = √2/2
    assert warmup_cosine(10, LR, FLOOR, WARMUP, TOTAL) == pytest.approx(3e-3, rel=1e-15)
    assert warmup_cosine(60, LR, FLOOR, WARMUP, TOTAL) == pytest.approx((3e-3 + 3e-4) / 2, rel=1e-15)
    assert warmup_cosine(110, LR, FLOOR, WARMUP, TOTAL) == pytest.approx(3e-4, rel=1e-15)
    quarter = 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.sqrt(2) / 2)
    assert warmup_cosine(35, LR, FLOOR, WARMUP, TOTAL) == pytest.approx(quarter, rel=1e-14)


def test_no_warmup_and_the_floor_at_lr_is_a_constant_lr():
    assert {warmup_cosine(t, LR, LR, 0, TOTAL) for t in range(TOTAL)} == {LR}


def test_the_lr_never_rises_after_the_warmup():
    lrs = [warmup_cosine(t, LR, FLOOR, WARMUP, TOTAL) for t in range(WARMUP, TOTAL)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("lr_min, warmup, total, message", [
    (-1e-4, 0, 10, "lr_min must be in [0, lr_max"), (4e-3, 0, 10, "lr_min must be in [0, lr_max"),
    (0.0, 10, 10, "warmup must be in [0, 10)"), (0.0, -1, 10, "warmup must be in [0, 10)")])
def test_a_schedule_that_cannot_run_is_refused(lr_min, warmup, total, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_schedule(LR, lr_min, warmup, total)
