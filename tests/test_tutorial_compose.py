"""tutorials/compose.py runs to the end under mpiexec on 1, 2, 4 and 8 ranks and passes its own check: one
train_step on a (dp, pp, cp, tp) mesh -- 1F1B over the stages, ring attention inside them, ZeRO-1, dropout
on, float64 -- equals the serial nn.GPT's step on the whole batch (loss, gradient norm, every updated
parameter within 1e-12), ZeRO-1 keeps exactly the slice it printed, and every rank of a stage sent the
same. On fewer than 8 ranks it shrinks its mesh (dp first, then tp, cp, pp) and says so; `--mesh 1 2 2 2`
adds tensor and sequence parallelism; on 3 ranks no mesh fits and every rank stops before any collective.
The tiny model keeps the 8-rank launch at a few seconds, oversubscribed on a small machine.
"""
import re

import pytest

from tutorial_runner import assert_stops_before_any_collective, assert_verdict, launch, needs_mpiexec, rank_lines

MESHES = {1: (1, 1, 1, 1), 2: (1, 2, 1, 1), 4: (1, 2, 2, 1), 8: (2, 2, 2, 1)}


def verdict(mesh):
    return f"check: (dp, pp, cp, tp) = {mesh} step == serial step"


def wire(out):
    """{(group, op): [cell per stage]} from part 4's table ("2: 1,024 B" cells)."""
    rows = re.findall(r"^     (\w+) +(\w+) +((?:[\d,]+: [\d,]+ B|-)(?: +(?:[\d,]+: [\d,]+ B|-))*)$", out, re.M)
    return {(group, op): re.findall(r"[\d,]+: [\d,]+ B|-", cells) for group, op, cells in rows}


@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_tutorial_proves_the_composed_step_is_the_serial_step(ranks, device):
    run = launch("compose.py", ranks=ranks, device=device, timeout=120)
    mesh = MESHES[ranks]
    assert_verdict(run, verdict(mesh), ranks)
    out = run.stdout
    shrunk = f"runs the largest of its meshes that fits (dp halved first, then tp, cp, pp): {mesh}"
    assert (shrunk in out) == (ranks < 8), out
    # each rank's listings in rank order: its groups (1), what it holds (2), its error against serial (1)
    assert rank_lines(out) == list(range(ranks)) * 4, out
    table = wire(out)
    dp, pp, cp, tp = mesh
    if ranks == 1:
        assert not table and "nothing: one rank has no one to talk to" in out, out
        return
    # the stage boundary: m = 2 activations out and 2 gradients in, each (s/cp, b/m, h) float64 --
    # s = 8, b = B/dp = 4/dp, h = 16
    message = 8 // cp * (4 // dp // 2) * 16 * 8
    assert table["pp", "send"] == table["pp", "recv"] == [f"2: {2 * message:,} B"] * pp, out
    assert table["embedding", "all_reduce"] == ["1: 3,072 B"] * pp, out  # the tied 24×16 table, float64
    assert (("cp", "sendrecv") in table) == (cp > 1), out
    replicas = "dp_cp" if cp > 1 else "dp"
    assert (((replicas, "reduce_scatter") in table) and ((replicas, "all_gather") in table)) == (dp * cp > 1), out
    assert not any(group == "tp" for group, _ in table), out  # tp = 1: nothing sent over it


@needs_mpiexec
def test_tensor_and_sequence_parallelism_inside_the_stages():
    run = launch("compose.py", "--mesh", "1", "2", "2", "2", ranks=8, timeout=120)
    assert_verdict(run, verdict((1, 2, 2, 2)), 8)
    table = wire(run.stdout)
    assert {("tp", "reduce_scatter"), ("tp", "all_gather"), ("cp", "sendrecv")} <= set(table), run.stdout
    assert table["pp", "send"] == ["2: 1,024 B"] * 2, run.stdout  # (s/(cp·t), b/m, h) = (2, 2, 16) under SP
    assert "(under SP, LayerNorm and dropout: " in run.stdout, run.stdout


@needs_mpiexec
def test_no_mesh_fits_three_ranks():
    assert_stops_before_any_collective(launch("compose.py", ranks=3), 3, "This tutorial runs on 1, 2, 4 or 8 ranks")
