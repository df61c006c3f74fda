"""tutorials/pipeline.py runs to the end under mpiexec on 1, 2 and 4 ranks and passes its own check: each
schedule's loss and gradients equal the serial GPT's within 1e-12, and every stage holds the activations
its schedule promises. It prints each rank's stage, plan and traffic in rank order, every timeline with
the bubble equal to the formula, and saves the timelines' picture; on 3 ranks (8 layers do not split)
every rank stops before anything is sent, rank 0 saying why once."""
import re

import pytest

from tutorial_runner import assert_stops_before_any_collective, assert_verdict, launch, needs_mpiexec, rank_lines

VERDICT = "check: pipelined GPT == serial GPT"


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_tutorial_proves_the_pipeline_is_the_serial_model(ranks, device, tmp_path):
    picture = tmp_path / "schedules.png"
    run = launch("pipeline.py", "--picture", str(picture), ranks=ranks, device=device, timeout=120)
    assert_verdict(run, VERDICT, ranks)
    schedules = 3 if ranks > 1 else 2  # no interleaving on one stage
    # the stages (1 or 2 listings), each schedule's plan, the traffic, each schedule's activations
    assert rank_lines(run.stdout) == list(range(ranks)) * ((2 if ranks > 1 else 1) + 2 * schedules + 1)
    bubbles = re.findall(r"idle on every stage: (\S+) of the step; the formula .* = (\S+)", run.stdout)
    assert len(bubbles) == schedules and all(measured == formula for measured, formula in bubbles), bubbles
    assert picture.exists() or "matplotlib is not installed" in run.stdout


@needs_mpiexec
def test_tutorial_says_when_the_layers_do_not_split():
    assert_stops_before_any_collective(launch("pipeline.py", ranks=3), 3)
