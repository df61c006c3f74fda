"""tutorials/collectives.py runs to the end under mpiexec on 1, 2 and 4 ranks, and as a plain script, and
passes its own check.

Its verdict line is printed only when every rank agrees that the collectives gave the sums and
concatenations they should, that all-gather(reduce-scatter(x)) equals all-reduce(x) in values and in
ring bytes, and that the gradients through f, f̄, g and ḡ equal the serial computation's within 1e-12
(it exits 1 otherwise, on every rank). These tests launch it as a learner does, in fresh processes
outside any MPI job this test may itself be running in, and check the numbers it prints against the
formulas, not against recorded output (tutorial_runner.py launches it and reads the verdict).
"""
import re

import pytest

from tutorial_runner import assert_verdict, launch, needs_mpiexec, rank_lines

VERDICT = "check: all-reduce == all-gather(reduce-scatter); f, f̄, g, ḡ gradients == serial"
# the per-rank listings, in order: x, all-reduce, all-gather, reduce-scatter, all-gather(reduce-scatter),
# f/f̄ vs serial, g/ḡ shapes, g/ḡ vs serial
LISTINGS = 8


def numbers(text):
    """"[0 1 | 2 3]" -> [0, 1, 2, 3]"""
    return [float(v) for v in text.strip("[]").replace("|", " ").split()]


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_collectives_tutorial_under_mpiexec(ranks, device):
    completed = launch("collectives.py", ranks=ranks, device=device)
    assert_verdict(completed, VERDICT, ranks)
    out = completed.stdout
    # every per-rank listing names every rank once, in rank order
    assert rank_lines(out) == list(range(ranks)) * LISTINGS

    # What the learner reads is right: rank r's x is 10r + (0 .. 2n-1); the all-reduce is the sum over
    # the ranks, the all-gather their concatenation in rank order, and rank r's reduce-scatter block r.
    length = 2 * ranks
    inputs = [[10.0 * r + i for i in range(length)] for r in range(ranks)]
    total = [sum(column) for column in zip(*inputs)]
    shown = {name: [numbers(v) for v in re.findall(rf"^   rank \d+: {re.escape(name)} = (\[[^]]*\])", out, re.M)]
             for name in ("x", "all_reduce(x)", "all_gather(x)", "reduce_scatter(x)",
                          "all_gather(reduce_scatter(x))")}
    assert shown["x"] == inputs, out
    assert shown["all_reduce(x)"] == [total] * ranks, out
    assert shown["all_gather(x)"] == [sum(inputs, [])] * ranks, out
    assert shown["reduce_scatter(x)"] == [total[2 * r:2 * r + 2] for r in range(ranks)], out
    assert shown["all_gather(reduce_scatter(x))"] == [total] * ranks, out

    # The ring bytes from the log: all-reduce 2(n-1)/n·S == reduce-scatter (n-1)/n·S + all-gather (n-1)/n·S
    match = re.search(r"S = .* = (\d+) B; .* all-reduce .* = ([\d.]+) B == reduce-scatter ([\d.]+) B "
                      r"\+ all-gather ([\d.]+) B", out)
    assert match, out
    payload, all_reduce, reduce_scatter, all_gather = map(float, match.groups())
    assert payload == length * 8, match.group(0)
    assert all_reduce == 2 * (ranks - 1) / ranks * payload == reduce_scatter + all_gather, match.group(0)
    assert reduce_scatter == all_gather == (ranks - 1) / ranks * payload, match.group(0)
    match = re.search(r"f/f̄ ([\d.]+) B .* g/ḡ ([\d.]+) B", out)
    assert match and match.group(1) == match.group(2), out
    # Without f, dL/dx misses the other ranks' terms: an error as soon as there are two ranks.
    missing = float(re.search(r"without f, .* max error ([0-9.e+-]+)", out).group(1))
    assert (missing == 0.0) if ranks == 1 else (missing > 1e-3), out


def test_collectives_tutorial_as_a_plain_script():
    # `python tutorials/collectives.py` with no launcher: MPI starts a singleton, one rank.
    assert_verdict(launch("collectives.py"), VERDICT, 1)
