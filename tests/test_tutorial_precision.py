"""tutorials/precision.py runs to the end under mpiexec on 1, 2 and 4 ranks and passes its own check.

Its verdict is printed only when fp16's figures from numpy.finfo equal the bit layout's formulas (the same
formulas that give bf16's without ml_dtypes), an AdamW update below fp16's resolution is lost on the fp16
weight and kept by MasterWeights, an fp16 underflow is saved by DynamicLossScaler and an overflow skips
the step and halves S, an fp16 GPT with MasterWeights holds 2Ψ + 2Ψ + 12Ψ bytes per rank (measured, to the
byte), and the stage 1-3 rows by hand equal the planner's (it exits 1 otherwise, on every rank). The
printed table is checked here too, recomputed from the Ψ and N_d it prints.
"""
import re

import numpy
import pytest

from tutorial_runner import assert_verdict, launch, needs_mpiexec, rank_lines

VERDICT = "check: mixed precision == its formulas"


def number(text):
    return int(text.replace(",", ""))


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_precision_tutorial_under_mpiexec(ranks):
    run = launch("precision.py", ranks=ranks, timeout=120)
    assert_verdict(run, VERDICT, ranks)
    out = run.stdout
    assert rank_lines(out) == list(range(ranks)), out  # the measured model states, one line per rank
    eps = float(re.search(r"ε: 1 \+ ε the next +([\d.e+-]+)", out).group(1))
    assert eps == pytest.approx(float(numpy.finfo(numpy.float16).eps), rel=1e-4), out
    assert "plain AdamW on the fp16 weight, 10 steps of lr = 0.0001: w = 1.0" in out, out
    psi = number(re.search(r"Ψ = ([\d,]+) parameters", out).group(1))
    d = int(re.search(r"N_d = (\d+), K = 12", out).group(1))
    assert d == ranks and psi % ranks == 0, out
    for line in re.findall(r"^   rank \d+: (.*)$", out, re.M):
        parameters, gradients, states = (number(v) for v in re.findall(r"([\d,]+) B \(", line))
        assert (parameters, gradients, states) == (2 * psi, 2 * psi, 12 * psi), line
    # the table: parameters, gradients, K (masters + moments), per rank, the planner's per rank (* formula only)
    rows = {m.group(1): [number(v) for v in m.groups()[1:]] for m in re.finditer(
        r"^   (ZeRO-0|stage \d) .*? {2,}([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+)\*? +(?:measured|formula)", out, re.M)}
    paper = {"ZeRO-0": (2 * psi, 2 * psi, 12 * psi), "stage 1": (2 * psi, 2 * psi, 12 * psi // d),
             "stage 2": (2 * psi, 2 * psi // d, 12 * psi // d), "stage 3": (2 * psi // d, 2 * psi // d, 12 * psi // d)}
    assert set(rows) == set(paper), out
    for stage, (p, g, k) in paper.items():
        assert rows[stage] == [p, g, k, p + g + k, p + g + k], (stage, out)
    assert out.count("formula (mixed precision with ZeRO is not built in minitp)") == 3, out
