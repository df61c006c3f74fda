"""tutorials/experts.py runs to the end under mpiexec on 1, 2 and 4 ranks and passes its own check.

Its verdict is printed only when the expert-parallel MoE layer equals the serial one within 1e-12 (output,
aux loss, every gradient, the same dropped tokens) and a MoE GPT equals the serial GPT over 3 AdamW steps
(it exits 1 otherwise, on every rank). The routing table it prints is checked here against the capacity
rule, recounted from the table itself: per expert, at most ⌈c·T·k/E⌉ pairs kept, first choices before
second ones, tokens in order; and the bytes line against 4·h·8·(rows sent away).
"""
import math
import re

import pytest

from tutorial_runner import assert_verdict, launch, needs_mpiexec, rank_lines

VERDICT = "check: the expert-parallel MoE == serial MoE"


def recount(out):
    """Each token's (expert, kept) pairs, in token order, from the printed table; the slots per expert."""
    pairs = {}
    for token, rest in re.findall(r"token +(\d+) -> (.*)", out):
        pairs[int(token)] = [(int(e), x is None or x == "") for e, x in re.findall(r"e(\d+) \([0-9.]+\)( x)?", rest)]
    slots = int(re.search(r"= (\d+) slots per expert", out).group(1))
    return [pairs[t] for t in sorted(pairs)], slots


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_experts_tutorial_under_mpiexec(ranks):
    run = launch("experts.py", ranks=ranks, timeout=180)
    assert_verdict(run, VERDICT, ranks)
    out = run.stdout
    assert rank_lines(out) == list(range(ranks)) * 3, out  # the table, the drops, the bytes
    table, slots = recount(out)
    k, E = 2, 4
    assert len(table) == 12 and slots == math.ceil(0.75 * 12 * k / E), out
    used = [0] * E  # first come first served, by hand
    for j in range(k):
        for t, choices in enumerate(table):
            expert, kept = choices[j]
            assert kept == (used[expert] < slots), (t, j, out)
            used[expert] += kept
    rows = int(re.search(r"= 4·8·8·(\d+) =", out).group(1))
    assert (rows == 0) == (ranks == 1), out  # one rank sends nothing away
