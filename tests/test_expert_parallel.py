"""Expert parallelism against the serial mixture of experts, in float64, on 2, 4 and 8 ranks: every (tp, dp, ep)
mesh the launch allows (ep dividing dp, tp in {1, 2}).

- The MoE layer: this replica's output columns, the aux loss (the mean over dp of the ranks' = the serial
  one), which (token, choice) pairs are dropped (exactly serial's rows), and every gradient -- the router's
  summed over dp, each expert's summed over its expert-data-parallel group and gathered over tp and ep --
  with and without capacity drops, top-1 and top-2.
- A GPT with MoE blocks: 3 AdamW steps of ``train_step`` (dropout 0.1, drops on), losses and gradient norms,
  every clipped gradient of step 1 and every parameter after step 3, against the serial GPT's steps.
- Refusals on every rank before any collective: E not divisible by ep, k > E, c <= 0, ep not dividing dp,
  ZeRO with experts spread over ep.
"""
import math

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Tensor, comm
from minitp import functional as F
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.nn.moe import MoE
from minitp.parallel import AllReduceGradients, ParallelGPT, ZeroOptimizer
from minitp.parallel.data.data_parallel import split_batch
from minitp.parallel.expert.layers import ExpertParallelLayers
from minitp.parallel.tensor.shard import gather_serial_grads, gather_serial_state
from minitp.testing import max_error
from minitp.training import train_step
from parallel_helpers import value_error

WORLD = MPI.COMM_WORLD
SAME = 1e-12
H, FFN, E, S, B = 8, 8, 8, 4, 8


def meshes(limit=None):
    """(tp, dp, ep) for this launch: tp in {1, 2}, ep dividing dp and E, ep > 1 or tp > 1 first."""
    found = [(tp, WORLD.size // tp, ep) for tp in (1, 2) if WORLD.size % tp == 0
             for ep in (8, 4, 2, 1) if (WORLD.size // tp) % ep == 0 and E % ep == 0]
    return found[:limit]


def init(tp, dp, ep):
    return comm.init(tp=tp, dp=dp, ep=ep)


def merged_over_ep(arrays, mesh):
    """{serial name: array} of every expert, from every ep rank's own ({name: array} over tp already)."""
    merged = {}
    for part in mesh.ep.comm.allgather(arrays):
        merged.update(part)
    return merged


def layer(k, capacity_factor, layers=None):
    moe = MoE(H, E, top_k=k, ffn_hidden=FFN, capacity_factor=capacity_factor, aux_loss_coef=0.1, z_loss_coef=0.01,
              dtype=numpy.float64, seed=5, **({} if layers is None else {"layers": layers}))
    return moe


def randomized(moe):
    """Every parameter N(0, 0.5²) from its serial name and shape (the router away from ties, biases nonzero)."""
    rng = numpy.random.default_rng(11)
    full = {}
    for name, shape in (("router.weight", (H, E)),) + tuple(
            (f"experts.{e}.{part}", shape) for e in range(E) for part, shape in
            (("fc1.weight", (H, FFN)), ("fc1.bias", (FFN,)), ("fc2.weight", (FFN, H)), ("fc2.bias", (H,)))):
        full[name] = 0.5 * rng.standard_normal(shape)
    return full


def load(moe, full, tp_group):
    for name, p in moe.named_parameters():
        value, axis = full[name], getattr(p, "split_axis", None)
        p.data[...] = value if axis is None else comm.split(value, tp_group, axis)


@pytest.mark.parallel(nprocs=[2, 4, 8])
@pytest.mark.parametrize("k, capacity_factor", [(1, None), (2, None), (1, 0.75), (2, 0.5)])
def test_moe_layer_equals_serial(k, capacity_factor):
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((S, B, H))
    upstream = rng.standard_normal((S, B, H))
    full = randomized(None)
    serial = layer(k, capacity_factor)
    for name, p in serial.named_parameters():
        p.data[...] = full[name]
    sx = Tensor(x.copy(), requires_grad=True)
    y = serial(sx)
    (F.sum(y * Tensor(upstream)) + serial.aux_loss).backward()
    serial_grads = {name: p.grad for name, p in serial.named_parameters()}
    results = []
    for tp, dp, ep in meshes(limit=4 if WORLD.size == 8 else None):
        mesh = init(tp, dp, ep)
        moe = layer(k, capacity_factor, ExpertParallelLayers(mesh))
        load(moe, full, mesh.tp)
        xr = Tensor(split_batch(x, mesh).copy(), requires_grad=True)
        yr = moe(xr)
        aux = moe.aux_loss.item()
        (F.sum(yr * Tensor(split_batch(upstream, mesh).copy())) + moe.aux_loss * (1 / dp)).backward()
        errors = {"output": max_error(yr, split_batch(y.data, mesh)),
                  "input grad": max_error(xr.grad, split_batch(sx.grad, mesh)),
                  "aux loss": abs(mesh.dp.comm.allreduce(aux) / dp - serial.aux_loss.item())}
        T = S * B // dp
        rows = slice(mesh.dp_rank * T, (mesh.dp_rank + 1) * T)
        same_drops = numpy.array_equal(moe.routing.kept, serial.routing.kept[rows])
        grads = gather_serial_grads(moe, mesh.tp)
        router = comm.all_reduce(grads.pop("router.weight"), mesh.dp)
        errors["router grad"] = max_error(router, serial_grads["router.weight"])
        experts = merged_over_ep({n: comm.all_reduce(g, mesh.expert_dp) for n, g in grads.items()}, mesh)
        errors.update({f"{n} grad": max_error(experts[n], serial_grads[n]) for n in serial_grads if n != "router.weight"})
        results.append(((tp, dp, ep), max(errors.values()), max(errors, key=errors.get), same_drops, len(experts)))
    bad = [r for r in results if not (r[1] <= SAME and r[3] and r[4] == 4 * E)]
    dropped = serial.routing.dropped
    parallel_assert(not bad, f"k={k} c={capacity_factor}: {bad}")
    parallel_assert((dropped > 0) == (capacity_factor is not None), f"drops: {dropped}")


CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, ffn_hidden=16, dropout=0.1, seed=7, dtype="float64",
              experts=4, top_k=2, capacity_factor=0.75, aux_loss_coef=0.05, z_loss_coef=1e-3)
STEPS, GPT_BATCH, LR, MAX_NORM = 3, 8, 0.01, 0.5


def gpt_meshes():
    """(tp, dp, ep, sequence_parallel, overlap) per launch size."""
    return {2: [(1, 2, 2, False, False), (2, 1, 1, True, False), (1, 2, 1, False, True)],
            4: [(1, 4, 4, False, False), (1, 4, 2, False, True), (2, 2, 2, False, False), (2, 2, 2, True, True)],
            8: [(2, 4, 4, True, False), (1, 8, 4, False, True)]}[WORLD.size]


def batches():
    rng = numpy.random.default_rng(0)
    for _ in range(STEPS):
        windows = rng.integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, GPT_BATCH))
        yield windows[:-1], windows[1:]


def gathered(model, mesh, what):
    local = (gather_serial_grads if what == "grads" else gather_serial_state)(model, mesh.tp)
    dense = {n: v for n, v in local.items() if ".experts." not in n}
    return {**dense, **merged_over_ep({n: v for n, v in local.items() if ".experts." in n}, mesh)}


@pytest.mark.parallel(nprocs=[2, 4, 8])
def test_moe_gpt_trains_as_serial():
    serial = GPT(GPTConfig(**CONFIG))
    optimizer = AdamW(serial.named_parameters(), lr=LR, weight_decay=0.01)
    expected = []
    for step, (ids, targets) in enumerate(batches()):
        loss, norm = train_step(serial, optimizer, ids, targets, max_norm=MAX_NORM)
        expected.append((loss, norm, {n: p.grad.copy() for n, p in serial.named_parameters()} if step == 0 else None))
    final = serial.state_dict()
    failures = []
    for tp, dp, ep, sp, overlap in gpt_meshes():
        mesh = init(tp, dp, ep)
        model = ParallelGPT(GPTConfig(**CONFIG), mesh, sequence_parallel=sp)
        optimizer = AdamW(model.named_parameters(), lr=LR, weight_decay=0.01)
        sync = AllReduceGradients(model, mesh, bucket_bytes=2048, overlap=overlap)
        errors = {}
        for step, (ids, targets) in enumerate(batches()):
            loss, norm = train_step(model, optimizer, ids, targets, mesh, max_norm=MAX_NORM, gradients=sync)
            errors[f"loss {step}"] = abs(loss - expected[step][0])
            errors[f"norm {step}"] = abs(norm - expected[step][1]) / expected[step][1]
            if step == 0:
                grads = gathered(model, mesh, "grads")
                errors["names"] = 0.0 if set(grads) == set(expected[0][2]) else math.inf
                errors.update({f"{n} grad": max_error(grads[n], g) for n, g in expected[0][2].items() if n in grads})
        state = gathered(model, mesh, "state")
        errors.update({f"{n} after {STEPS}": max_error(state[n], v) for n, v in final.items() if n in state})
        worst = max(errors, key=errors.get)
        if not errors[worst] <= SAME:
            failures.append(((tp, dp, ep, sp, overlap), worst, errors[worst]))
    parallel_assert(not failures, f"{failures}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_bad_input_is_refused_on_every_rank_before_any_collective():
    mesh = init(1, WORLD.size, WORLD.size)
    cases = {
        "ep does not divide E": (lambda: ParallelGPT(GPTConfig(**{**CONFIG, "experts": WORLD.size + 1, "top_k": 1}),
                                                     mesh), "experts (split over ep)"),
        "k > E": (lambda: ParallelGPT(GPTConfig(**{**CONFIG, "top_k": 5}), mesh), "top_k must be"),
        "c <= 0": (lambda: ParallelGPT(GPTConfig(**{**CONFIG, "capacity_factor": 0.0}), mesh), "capacity_factor"),
        "ep does not divide dp": (lambda: comm.init(tp=1, dp=WORLD.size, ep=3), "ep (3) must divide dp"),
        "ZeRO": (lambda: train_step(*zero_model(mesh), *next(batches()), mesh), "ZeRO with experts"),
    }
    for what, (build, words) in cases.items():
        error, collectives = value_error(build)
        parallel_assert(error is not None and words in error and collectives == 0, f"{what}: {error} ({collectives})")


def zero_model(mesh):
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    return model, ZeroOptimizer(AdamW(model.named_parameters(), lr=LR), mesh)
