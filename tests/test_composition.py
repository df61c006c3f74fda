"""Every legal composition of dp, pp, cp and tp, one training step each, against the serial model.

One step of ``minitp.training.train_step`` (the forward-backward, the gradient synchronisation, the
clip by the global norm, the SGD step) on every mesh (dp, pp, cp, tp) ∈ {1, 2}⁴ that fits the launch
(product = the world size: 1 mesh on 1 rank, 4 on 2, 6 on 4, 4 on 8 -- all 16 but (2, 2, 2, 2)), with

- sequence parallelism on and off (where tp = 2),
- ZeRO on and off (``ZeroOptimizer`` stage 1 or 2, or ``FullyShardedOptimizer`` -- stage 3, not on pipeline
  stages -- around the SGD, taking turns; or ``AllReduceGradients``),
- overlap on and off (the overlapped buckets of the synchronisation AND the asynchronous
  column-parallel backward of the model, together),
- where pp = 2, each schedule: afab, 1f1b (2 microbatches, one chunk per stage) and interleaved
  (2 microbatches, 2 virtual stages: one block per chunk); where pp = 1 the whole batch at once,
- where cp = 2, the kind (ring, zigzag, ulysses) and, everywhere, tied / untied embeddings taking turns
  rather than multiplying the product (``combinations``: each run takes the pair seen least so far):
  on every mesh with cp = 2 each kind and each tie run, and where the mesh has the runs for it, each
  kind meets both ties, each schedule, SP on and off, ZeRO on and off, overlap on and off; and
  recomputation (none, selective, full) in turn, run after run (the serial reference has none);

against the serial ``nn.GPT`` step on the whole batch (same GPTConfig, float64, dropout 0.1 everywhere:
every mask must land where the serial one does), computed by hand from its gradients: the norm, the
clip (max_norm below the norm, so the clip happens and the global norm is exercised), p - lr·g. Each
run is compared on the loss, the gradient norm, every (clipped) gradient -- gathered over tp, the
stages' sets merged over pp -- and every updated parameter. Under ZeRO-1 ``.grad`` is dropped after the
reduce-scatter: there the updated parameters (p - lr·g with SGD, so the gradient to the last bit) and
the norm stand for the gradients.

Per launch (``parallel[N]``): N = 1: 4 combinations (1 mesh), 2: 28 (4 meshes), 4: 68 (6 meshes),
8: 68 (4 meshes) -- 168 in all, each within 1e-12 (relative to max(1, |expected|)); the largest
difference seen is 4.4e-16 (the same sums in another order). All combinations of one launch run in ONE
test, so each mesh's communicators are built once: the 8-rank launch, oversubscribed on 2 busy cores,
takes ~33 s (4 ranks ~10 s, 2 ranks ~3 s, 1 rank < 1 s). A failure lists every combination that
differs, with its worst quantity.
"""
import collections
import contextlib
import itertools
import math
import time

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp import functional as F
from minitp.nn import GPT, GPTConfig
from minitp.nn.optim import SGD
from minitp.parallel import AllReduceGradients, FullyShardedOptimizer, ParallelGPT, ZeroOptimizer
from minitp.parallel.context.layers import KINDS
from minitp.parallel.tensor.shard import gather_serial_grads, gather_serial_state
from minitp.pipeline import PipelineGPT
from minitp.testing import max_error
from minitp.training import Pipelined, train_step, whole_batch

WORLD = MPI.COMM_WORLD
SAME = 1e-12
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=4, dropout=0.1, seed=7, dtype="float64")
BATCH, LR, MICROBATCHES = 4, 0.5, 2
CLIP = 0.5  # max_norm = CLIP × the serial gradient's norm: every step is clipped
BUCKET_BYTES = 4096  # several buckets per stage (the tiny model has ~20 KB of float64 parameters)
SCHEDULES = {"afab": 1, "1f1b": 1, "interleaved": 2}  # schedule: virtual stages


RECOMPUTE = (None, "selective", "full")


def batch(seed=0):
    windows = numpy.random.default_rng(seed).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, BATCH))
    return windows[:-1], windows[1:]


def config(tie_embeddings):
    return GPTConfig(**CONFIG, tie_embeddings=tie_embeddings)


def serial_reference(tie_embeddings, ids, targets):
    """The serial step on the whole batch, written out: (loss, norm, max_norm, {name: clipped gradient},
    {name: updated value}). The norm over every parameter once, the clip by torch's rule
    (max_norm / (norm + 1e-6) when below 1), then plain SGD."""
    model = GPT(config(tie_embeddings))
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    loss = F.cross_entropy(model(ids), targets)
    loss.backward()
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    norm = math.sqrt(sum(float(numpy.vdot(g, g)) for g in grads.values()))
    max_norm = CLIP * norm
    scale = min(1.0, max_norm / (norm + 1e-6))
    clipped = {name: g * scale for name, g in grads.items()}
    updated = {name: before[name] - LR * clipped[name] for name in before}
    return loss.item(), norm, max_norm, clipped, updated


def combinations(world_size):
    """Every combination this launch runs: dicts of mesh (dp, pp, cp, tp), sequence_parallel, zero,
    overlap, schedule (None: the whole batch), kind (None without cp) and tie_embeddings.

    The full product of SP, ZeRO, overlap and schedule on each mesh; the kind and the tie take turns
    instead: each run takes the (kind, tie) seen least so far on its mesh -- overall, and beside its own
    SP, ZeRO, overlap and schedule -- so that each kind meets each tie, each schedule, SP and ZeRO."""
    meshes = [shape for shape in itertools.product((1, 2), repeat=4) if math.prod(shape) == world_size]
    runs = []
    for dp, pp, cp, tp in meshes:
        turns = list(itertools.product(KINDS if cp == 2 else [None], [False, True]))  # (kind, tie)
        seen = collections.Counter()
        for sp, zero, overlap, schedule in itertools.product(
                [False, True] if tp == 2 else [False], [False, True], [False, True],
                list(SCHEDULES) if pp == 2 else [None]):
            beside = [("sp", sp), ("zero", zero), ("overlap", overlap), ("schedule", schedule)]
            kind, tie = min(turns, key=lambda turn: (seen[turn], sum(seen[option, turn[0]] for option in beside),
                                                     sum(seen[option, turn[1]] for option in beside)))
            seen.update([(kind, tie)] + [(option, part) for option in beside for part in (kind, tie)])
            runs.append(dict(mesh=(dp, pp, cp, tp), sequence_parallel=sp, zero=zero, overlap=overlap,
                             schedule=schedule, kind=kind, tie_embeddings=tie,
                             # recomputation takes turns too: the serial reference runs without it, so
                             # each run also proves that re-running in backward changes no number
                             recompute=RECOMPUTE[len(runs) % len(RECOMPUTE)]))
            if zero:  # the ZeRO stage takes turns too; stage 3 shards no pipeline stage (zero3.check_mesh)
                stages = (1, 2, 3) if pp == 1 else (1, 2)
                runs[-1]["zero"] = stages[sum(1 for r in runs if r["zero"] and r["mesh"] == runs[-1]["mesh"]) % len(stages)]
    return runs


def describe(run):
    dp, pp, cp, tp = run["mesh"]
    words = [f"dp{dp} pp{pp} cp{cp} tp{tp}", run["schedule"] or "whole batch", run["kind"] or "",
             "SP" if run["sequence_parallel"] else "", f"ZeRO-{run['zero']}" if run["zero"] else "all-reduce",
             "overlap" if run["overlap"] else "", "tied" if run["tie_embeddings"] else "untied",
             f"recompute {run['recompute']}" if run["recompute"] else ""]
    return ", ".join(word for word in words if word)


def parallel_step(run, ids, targets, max_norm):
    """One ``train_step`` of ``run`` on its mesh: (loss, norm, {name: gradient over tp, or None},
    {name: updated value over tp}) of this rank's part of the model."""
    dp, pp, cp, tp = run["mesh"]
    mesh = comm.init(dp=dp, pp=pp, cp=cp, tp=tp)
    cfg = GPTConfig(**CONFIG, tie_embeddings=run["tie_embeddings"], recompute=run["recompute"])
    sp, overlap = run["sequence_parallel"], run["overlap"]
    if pp == 1:
        model = ParallelGPT(cfg, mesh, sp, context_parallel=run["kind"], overlap=overlap)
        forward_backward = whole_batch
    else:
        model = PipelineGPT(cfg, mesh, sp, SCHEDULES[run["schedule"]], context_parallel=run["kind"],
                            overlap=overlap)
        forward_backward = Pipelined(run["schedule"], MICROBATCHES)
    optimizer = SGD(model.named_parameters(), lr=LR)
    if run["zero"] == 3:
        optimizer, gradients = FullyShardedOptimizer(optimizer, model, mesh, overlap=overlap), None
    elif run["zero"]:
        optimizer, gradients = ZeroOptimizer(optimizer, mesh, BUCKET_BYTES, overlap=overlap, stage=run["zero"]), None
    else:
        gradients = AllReduceGradients(model, mesh, BUCKET_BYTES, overlap=overlap)
    loss, norm = train_step(model, optimizer, ids, targets, mesh, max_norm=max_norm, gradients=gradients,
                            forward_backward=forward_backward)
    whole = getattr(optimizer, "full_parameters", None)  # ZeRO-3 holds 1/d of each parameter: gather them
    with whole() if whole is not None else contextlib.nullcontext():
        return mesh, loss, norm, gather_serial_grads(model, mesh.tp), gather_serial_state(model, mesh.tp)


def errors(run, ids, targets, reference):
    """{what: difference} of one run against the serial ``reference`` on this rank (inf for a parameter
    missing or with a gradient where there should be none)."""
    serial_loss, serial_norm, max_norm, serial_grads, serial_state = reference
    mesh, loss, norm, grads, state = parallel_step(run, ids, targets, max_norm)
    found = {"loss": abs(loss - serial_loss), "norm": abs(norm - serial_norm) / serial_norm}
    held = set().union(*mesh.pp.comm.allgather(set(state)))  # the stages hold every parameter once
    if held != set(serial_state):
        found["the stages' parameters"] = math.inf
    for name, value in state.items():
        found[f"{name}"] = max_error(value, serial_state[name])
        grad = grads.get(name)
        if run["zero"]:  # ZeRO drops .grad after the reduce-scatter
            found[f"{name}.grad"] = 0.0 if grad is None else math.inf
        else:
            found[f"{name}.grad"] = math.inf if grad is None else max_error(grad, serial_grads[name])
    return found


@pytest.mark.parallel(nprocs=[1, 2, 4, 8])
def test_every_composition_equals_the_serial_step():
    """Every combination of this launch's meshes (module docstring), one step each: loss, norm, every
    gradient and every updated parameter within 1e-12 of the serial step."""
    start = time.perf_counter()
    ids, targets = batch()
    references = {tie: serial_reference(tie, ids, targets) for tie in (False, True)}
    runs = combinations(WORLD.size)
    worst, failures = 0.0, []
    for run in runs:
        found = errors(run, ids, targets, references[run["tie_embeddings"]])
        what = max(found, key=found.get)
        worst = max(worst, found[what])
        if found[what] > SAME:
            failures.append(f"{describe(run)}: {what} off by {found[what]:.2e}")
    worst = WORLD.allreduce(worst, op=MPI.MAX)
    seconds = time.perf_counter() - start
    if WORLD.rank == 0:
        print(f"\n{WORLD.size} ranks: {len(runs)} combinations, largest difference {worst:.2e}, {seconds:.1f} s")
    parallel_assert(not failures, f"{len(failures)} of {len(runs)} combinations differ from the serial step "
                                  f"(largest difference {worst:.2e}):\n" + "\n".join(failures))
    parallel_assert(worst <= SAME, f"largest difference {worst:.2e}")
