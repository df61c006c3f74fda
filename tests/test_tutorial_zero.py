"""tutorials/zero.py runs to the end under mpiexec on 1, 2, 3 and 4 ranks and passes its own check.

Its verdict is printed only when ZeRO-1's parameters equal plain data parallelism's within 1e-12 after
several steps, the optimizer state per rank is what the padding rule gives (1/d of plain's, rounded up
per bucket; all ranks together: plain's), and the reduce-scatters and all-gathers send the ring bytes
of the all-reduces plus the padding's share (it exits 1 otherwise, on every rank). The numbers it
prints are checked against those formulas here too, recomputed from the sizes it prints, and --png
draws the picture. 3 ranks is the case with padding: 3 does not divide every bucket.
"""
import re

import pytest

from tutorial_runner import assert_verdict, launch, needs_mpiexec, rank_lines

VERDICT = "check: ZeRO-1 == plain data parallelism"


def number(text):
    return int(text.replace(",", ""))


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_zero_tutorial_under_mpiexec(ranks, tmp_path):
    png = tmp_path / "zero.png"
    run = launch("zero.py", "--png", str(png), ranks=ranks, timeout=120)
    assert_verdict(run, VERDICT, ranks)
    out = run.stdout
    assert rank_lines(out) == list(range(ranks)) * 2, out  # the state per rank, the check
    states = re.findall(r"plain +([\d,]+) B   ZeRO-1 +([\d,]+) B .*\(by hand: ([\d,]+) B\)", out)
    plain, zero, by_hand = [[number(v) for v in column] for column in zip(*states)]
    assert len(set(plain)) == 1 and sum(zero) == plain[0] and zero == by_hand, out
    match = re.search(r"all-reduce ([\d,]+) B;  reduce-scatter ([\d,]+) B \+ all-gather ([\d,]+) B", out)
    all_reduce, scatter, gather = (number(v) for v in match.groups())
    match = re.search(r"by hand, d = (\d+), Σ n = ([\d,]+) elements in (\d+) buckets, Σ d·⌈n/d⌉ = ([\d,]+) "
                      r"\(padding (\d+)\)", out)
    d, elements, buckets, padded, padding = (number(v) for v in match.groups())
    # the padding rule: each bucket padded to a multiple of d, by fewer than d elements
    assert d == ranks and padded == elements + padding and padded % d == 0 and padding < d * buckets, out
    assert (padding > 0) == (ranks == 3), out  # 3 is the rank count that needs padding here
    # the formulas with padding, per rank (8 B a float64): all-reduce 2(d-1)/d·Σn·8 (printed rounded to
    # whole bytes); reduce-scatter = all-gather = (d-1)/d·Σ d⌈n/d⌉·8; so RS + AG = AR + 2(d-1)/d·padding·8
    assert abs(all_reduce - 2 * (d - 1) * elements * 8 / d) <= 0.5, out
    assert scatter == gather == (d - 1) * padded * 8 // d, out
    assert abs(scatter + gather - (all_reduce + 2 * (d - 1) * padding * 8 / d)) <= 0.5 + 1e-6, out
    assert plain[0] == 2 * 8 * elements, out  # AdamW's two float64 moments per parameter
    assert out.count("  compute |") == ranks and "% of the time one was in flight" in out, out
    assert png.exists() and png.stat().st_size > 1000
