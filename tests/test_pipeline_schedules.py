"""The pipeline schedules as plans (minitp.pipeline.schedules) and their replay on a logical clock
(minitp.pipeline.clock), exactly, with Fractions -- no MPI needed.

- every plan runs each (F, microbatch, chunk) and (B, microbatch, chunk) of its rank once, each
  chunk's forwards in microbatch order (the dropouts' step counter relies on it), each B after its F;
- the replay never deadlocks, and every rank idles exactly (p-1)/(m+p-1) of the step for AFAB and
  1F1B and (p-1)/(v·m+p-1) interleaved, with unit costs and with a backward twice a forward;
- the activations held at the peak: m (AFAB), min(p-r, m) (1F1B), the warm-up + 1 (interleaved);
- the warm-up (forwards before the first backward) is Megatron-LM's count, written out in this file
  (``megatron_warmup``), not taken from minitp: a plan that ran one forward too many would compute the
  same numbers and only hold one more microbatch, so nothing else here could see it;
- the printed plans and timelines; schedules that cannot run are refused with the reason.
"""
from fractions import Fraction
from itertools import product

import pytest

from minitp.pipeline.clock import bubble_formula, replay
from minitp.pipeline.schedules import SCHEDULES, check, describe, expected_in_flight, peak_in_flight, plan


def runnable(limit_p=6, limit_m=12):
    """(schedule, p, m, v) over a grid, m < p, m = p and m > p included, for every schedule that can run."""
    cases = []
    for schedule, p, m in product(SCHEDULES, range(1, limit_p + 1), range(1, limit_m + 1)):
        for v in ((1, 2, 3, 4) if schedule == "interleaved" else (1,)):
            try:
                check(schedule, p, m, v)
            except ValueError:
                continue
            cases.append((schedule, p, m, v))
    return cases


CASES = runnable()


def test_the_grid_holds_every_regime():
    for schedule in SCHEDULES:
        ps_ms = {(p, m) for s, p, m, _ in CASES if s == schedule and p > 1}
        assert any(m > p for p, m in ps_ms) and any(m == p for p, m in ps_ms)
        assert schedule == "interleaved" or any(m < p for p, m in ps_ms)


@pytest.mark.parametrize("schedule, p, m, v", CASES)
def test_each_plan_runs_every_action_once_forwards_in_order(schedule, p, m, v):
    for rank in range(p):
        actions = plan(schedule, p, m, v, rank)
        assert sorted(actions) == sorted((kind, i, k) for kind in "FB" for i in range(m) for k in range(v))
        for chunk in range(v):
            forwards = [a.microbatch for a in actions if a.kind == "F" and a.chunk == chunk]
            assert forwards == list(range(m)), "microbatch m-1 runs last: the dropout counters move on then"
        for index, action in enumerate(actions):
            if action.kind == "B":
                assert ("F", action.microbatch, action.chunk) in actions[:index]


@pytest.mark.parametrize("schedule, p, m, v", CASES)
def test_replay_idles_exactly_the_bubble_formula(schedule, p, m, v):
    expected = bubble_formula(schedule, p, m, v)
    for forward, backward in ((1, 1), (1, 2)):
        timeline = replay(schedule, p, m, v, forward, backward)
        fractions = [timeline.idle_fraction(rank) for rank in range(p)]
        assert all(isinstance(f, Fraction) for f in fractions)
        assert fractions == [expected] * p, f"{schedule} p={p} m={m} v={v}: {fractions} vs {expected}"
        assert timeline.makespan == (v * m + p - 1) * (forward + backward)


def megatron_warmup(schedule, p, m, v, rank):
    """Forwards before the first backward on stage ``rank``, as Megatron-LM counts them -- written out
    here from megatron/core/pipeline_parallel/schedules.py, independently of minitp's own code.

    - ``forward_backward_pipelining_without_interleaving`` (1F1B):
      ``num_warmup_microbatches = min(pipeline_parallel_size - pipeline_parallel_rank - 1, num_microbatches)``
    - ``forward_backward_pipelining_with_interleaving``, with ``total = num_microbatches · num_model_chunks``:
      if ``num_microbatches == pipeline_parallel_size`` every forward first (``total``, "all warm-up");
      else ``min((p - rank - 1)·2 + (num_model_chunks - 1)·p, total)``.
    - AFAB (GPipe; Megatron has no such schedule): every forward first, m.
    """
    if schedule == "afab":
        return m
    if schedule == "1f1b":
        return min(p - rank - 1, m)
    total = v * m
    if m == p:
        return total
    return min((p - rank - 1) * 2 + (v - 1) * p, total)


def forwards_first(actions):
    """Forwards before the first backward, counted on the plan itself."""
    kinds = [action.kind for action in actions]
    return kinds.index("B") if "B" in kinds else len(kinds)


def held_at_peak(actions):
    """Microbatch-chunks whose forward has run and backward not yet, at the worst moment of the plan
    (counted here, not by minitp's ``peak_in_flight``)."""
    held, peak = set(), 0
    for kind, microbatch, chunk in actions:
        (held.add if kind == "F" else held.remove)((microbatch, chunk))
        peak = max(peak, len(held))
    return peak


def expected_warmup(schedule, p, m, v, rank):
    """Megatron's count, with minitp's one documented departure: at m = p the interleaved schedule keeps
    the general count instead of Megatron's all warm-up. The replay above shows it costs no bubble
    (every case, m = p included, idles exactly (p-1)/(v·m+p-1)), and the later stages hold fewer
    activations than every forward first would; where m != p the two agree exactly."""
    if schedule == "interleaved" and m == p:
        return min((p - rank - 1) * 2 + (v - 1) * p, v * m)
    return megatron_warmup(schedule, p, m, v, rank)


def expected_forwards_first(schedule, p, m, v, rank):
    """What a plan shows of the warm-up: its forwards, then the forward of the first 1F1B pair, before
    the first backward -- unless the warm-up ran every forward. (A warm-up of v·m - 1 and one of v·m
    make the same plan.) It is also the most activations the stage holds: each of those forwards is
    held until its backward, and every later pair runs one forward and frees one."""
    return min(expected_warmup(schedule, p, m, v, rank) + 1, v * m)


@pytest.mark.parametrize("schedule, p, m, v", CASES)
def test_the_warm_up_is_megatrons(schedule, p, m, v):
    for rank in range(p):
        actions = plan(schedule, p, m, v, rank)
        forwards = forwards_first(actions)
        expected = expected_forwards_first(schedule, p, m, v, rank)
        assert forwards == expected, f"{schedule} p={p} m={m} v={v} stage {rank}: {forwards} forwards before the " \
            f"first backward, {expected} expected: {describe(actions, v)}"
        if schedule == "interleaved" and m == p:  # the departure: never more than Megatron's all warm-up
            assert forwards <= megatron_warmup(schedule, p, m, v, rank)


def test_the_warm_up_cases_cover_megatrons_branches():
    """The grid reaches every branch above: 1F1B capped by m (m < p - r - 1) and not; interleaved at
    m = p (where the cap at v·m binds on the first stages) and at m > p (where it never binds)."""
    assert ("1f1b", 4, 2, 1) in CASES and megatron_warmup("1f1b", 4, 2, 1, 0) == 2
    assert ("1f1b", 2, 6, 1) in CASES and megatron_warmup("1f1b", 2, 6, 1, 0) == 1
    assert ("interleaved", 4, 8, 2) in CASES and [megatron_warmup("interleaved", 4, 8, 2, r) for r in range(4)] == \
        [10, 8, 6, 4]
    assert ("interleaved", 4, 4, 2) in CASES and [expected_warmup("interleaved", 4, 4, 2, r) for r in range(4)] == \
        [8, 8, 6, 4]


@pytest.mark.parametrize("schedule, p, m, v", CASES)
def test_activations_held_at_the_peak(schedule, p, m, v):
    """Against the count written here: m (AFAB), min(p - r, m) (1F1B), Megatron's warm-up + 1 at most
    v·m (interleaved) -- and minitp's own ``expected_in_flight``/``peak_in_flight``, which the engine's
    report and the tutorial use, must say the same."""
    for rank in range(p):
        actions = plan(schedule, p, m, v, rank)
        held = held_at_peak(actions)
        expected = expected_forwards_first(schedule, p, m, v, rank)
        assert held == expected, f"{schedule} p={p} m={m} v={v} stage {rank}: held {held}, expected {expected}"
        assert peak_in_flight(actions) == expected_in_flight(schedule, p, m, v, rank) == held
        if schedule == "afab":
            assert held == m
        elif schedule == "1f1b":
            assert held == min(p - rank, m)


def test_the_plans_print_as_the_papers_draw_them():
    assert describe(plan("1f1b", 4, 6, 1, 1)) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5"
    assert describe(plan("afab", 2, 2, 1, 0)) == "F0 F1 B0 B1"
    assert describe(plan("interleaved", 2, 2, 2, 0), chunks=2) == "F0a F1a F0b F1b B0b B1b B0a B1a"
    text = replay("1f1b", 2, 2).text().splitlines()
    assert text == ["stage 0 | F0  F1  ·   B0  ·   B1 |",
                    "stage 1 | ·   F0  B0  F1  B1  ·  |"]


@pytest.mark.parametrize("schedule, p, m, v, words", [
    ("zigzag", 2, 2, 1, "unknown schedule"),
    ("1f1b", 2, 0, 1, "microbatches must be a positive integer"),
    ("afab", 0, 2, 1, r"pp \(stages\) must be a positive integer"),
    ("1f1b", 2, 2, 2, "need the interleaved schedule"),
    ("interleaved", 4, 6, 2, "6 microbatches is not a multiple of 4"),
    ("interleaved", 1, 4, 2, "at least 2 pipeline stages"),
])
def test_schedules_that_cannot_run_are_refused(schedule, p, m, v, words):
    with pytest.raises(ValueError, match=words):
        plan(schedule, p, m, v, 0)
