"""tutorials/precision.py runs to the end under mpiexec on 1, 2 and 4 ranks and passes its own check.

Its verdict is printed only when the finfo figures of fp16, bf16 (ml_dtypes) and fp32 equal the bit
layout's formulas, an AdamW update below fp16's resolution is lost on the fp16 weight and kept by
MasterWeights, an fp16 underflow is saved by DynamicLossScaler and an overflow skips the step and halves S,
and an fp16 GPT with fp32 masters holds, on every rank and to the byte, the ZeRO paper's rows: stage 0
(MasterWeights) 2Ψ + 2Ψ + 12Ψ, stage 1 2Ψ + 2Ψ + 12Ψ/N_d, stage 2 2Ψ + 14Ψ/N_d, stage 3 16Ψ/N_d -- measured,
with no padding and the masters sharded with the moments (it exits 1 otherwise, on every rank). The printed
per-rank lines and table are checked here too, recomputed from the Ψ and N_d it prints.
"""
import re

import numpy
import pytest

from tutorial_runner import assert_verdict, launch, needs_mpiexec, rank_lines

VERDICT = "check: mixed precision == its formulas"


def number(text):
    return int(text.replace(",", ""))


def paper(psi, d):
    """{stage: (parameters, gradients, K = 12 fp32 bytes)} per rank, the ZeRO paper's mixed-precision rows."""
    return {0: (2 * psi, 2 * psi, 12 * psi), 1: (2 * psi, 2 * psi, 12 * psi // d),
            2: (2 * psi, 2 * psi // d, 12 * psi // d), 3: (2 * psi // d, 2 * psi // d, 12 * psi // d)}


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_precision_tutorial_under_mpiexec(ranks):
    run = launch("precision.py", ranks=ranks, timeout=120)
    assert_verdict(run, VERDICT, ranks)
    out = run.stdout
    assert rank_lines(out) == list(range(ranks)), out  # the measured model states, one line per rank
    eps = re.search(r"ε: 1 \+ ε the next +([\d.e+-]+) +([\d.e+-]+)", out)
    assert float(eps.group(1)) == pytest.approx(float(numpy.finfo(numpy.float16).eps), rel=1e-4), out
    assert float(eps.group(2)) == 2.0 ** -7, out  # bf16: 7 mantissa bits
    assert "plain AdamW on the fp16 weight, 10 steps of lr = 0.0001: w = 1.0" in out, out
    psi = number(re.search(r"Ψ = ([\d,]+) parameters", out).group(1))
    d = int(re.search(r"N_d = (\d+), K = 12", out).group(1))
    assert d == ranks and psi % (4 * ranks) == 0, out
    rows = paper(psi, d)
    assert "padding 0, 0, 0, 0 elements" in out, out
    for line in re.findall(r"^   rank \d+: (.*)$", out, re.M):
        totals = {int(s): number(b) for s, b in re.findall(r"stage (\d): ([\d,]+) B", line)}
        assert totals == {s: sum(row) for s, row in rows.items()}, line
    # the table: parameters, gradients, K (masters + moments), per rank, the paper's per rank, the worst
    # rank's difference -- measured at every stage
    table = {int(m.group(1)): [number(v) for v in m.groups()[1:]] for m in re.finditer(
        r"^   stage (\d) +\S+ +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) +(\d+) B ", out, re.M)}
    assert set(table) == {0, 1, 2, 3}, out
    for stage, (p, g, k) in rows.items():
        assert table[stage] == [p, g, k, p + g + k, p + g + k, 0], (stage, out)
    assert "not built" not in out, out
