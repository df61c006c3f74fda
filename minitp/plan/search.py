"""Does it fit, and if not, what is the smallest change that makes it fit?

The moves (each one change of the command): sequence parallelism on; selective, then full recomputation;
the next ZeRO stage; half the microbatch (the global batch kept: twice the microbatches); tp or pp doubled
at the same number of GPUs (dp halved); tp, pp or dp doubled with more GPUs.

**Smallest** = the fewest moves (searched breadth first, up to ``depth``); among as many moves, first the
ones that keep the number of GPUs, then the fewest bytes sent per rank per step (the busiest stage), then
the fewest flops per step (recomputation costs a forward). A plan fits when its busiest pipeline stage's
total (model states + activations at the peak + the largest temporary) is at most the GPU's memory.
"""
from dataclasses import replace

from minitp.plan.core import plan
from minitp.plan.shapes import Choices


def _moves(model, mesh, choices):
    found = []
    if not choices.sequence_parallel and mesh.tp > 1:
        found.append(("--sp", mesh, replace(choices, sequence_parallel=True)))
    if choices.recompute is None:
        found.append(("--recompute selective", mesh, replace(choices, recompute="selective")))
    if choices.recompute in (None, "selective"):
        found.append(("--recompute full", mesh, replace(choices, recompute="full")))
    if choices.zero < 3:
        found.append((f"--zero {choices.zero + 1}", mesh, replace(choices, zero=choices.zero + 1)))
    if choices.micro_batch > 1:
        found.append((f"--micro-batch {choices.micro_batch // 2}", mesh,
                      replace(choices, micro_batch=choices.micro_batch // 2,
                              global_batch=choices.global_batch or choices.micro_batch * mesh.dp)))
    if mesh.dp % 2 == 0:
        found.append((f"--tp {mesh.tp * 2} --dp {mesh.dp // 2}", replace(mesh, tp=mesh.tp * 2, dp=mesh.dp // 2), choices))
        found.append((f"--pp {mesh.pp * 2} --dp {mesh.dp // 2}", replace(mesh, pp=mesh.pp * 2, dp=mesh.dp // 2), choices))
    found.append((f"--tp {mesh.tp * 2}", replace(mesh, tp=mesh.tp * 2), choices))
    found.append((f"--pp {mesh.pp * 2}", replace(mesh, pp=mesh.pp * 2), choices))
    return found


def _cost(result, moves, world):
    sent = max(sum(stage.sent().values()) for stage in result.stages)
    key = result.choices.recompute or "none"
    return (len(moves), result.mesh.world != world, sent, result.flops[key].value)


def smallest_change(model, mesh, choices, budget, depth=3):
    """(moves, plan) of the smallest change that fits ``budget`` bytes per GPU, or (None, None) within ``depth``."""
    world = mesh.world
    frontier, seen, best = [((), mesh, choices)], set(), None
    for _ in range(depth):
        following = []
        for moves, m, c in frontier:
            for word, m2, c2 in _moves(model, m, c):
                key = (m2, c2)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    result = plan(model, m2, c2)
                except ValueError:
                    continue
                path = moves + (word,)
                if result.peak <= budget:
                    cost = _cost(result, path, world)
                    if best is None or cost < best[0]:
                        best = (cost, path, result)
                following.append((path, m2, c2))
        if best is not None:
            return best[1], best[2]
        frontier = following
    return None, None
