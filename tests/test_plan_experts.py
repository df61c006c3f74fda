"""minitp.plan's experts against a measured run: from the routing counts the run observed, the MoE layers'
saved activations (``track_saved`` around the loss) and the whole ``train_step``'s collective log (the count
exchanges, dispatch and combine ``all_to_all_v`` each way, the experts' buckets over ``expert_dp``, the
experts' norm over ep) equal the plan's, byte for byte, on every ep rank -- and without the counts the plan
gives GShard's even spread, marked formula only.

2 and 4 ranks, tp 1, ep 2 and 4 out of dp (dp 4 × ep 2: two ep groups, experts reduced over expert_dp),
4 experts, top-1 and top-2, with and without a capacity (drops), dropout on once; s 8, h 16, 2 layers.
tp 2 (ep 1 and 2, SP on and off): each local expert's f̄/f on its own rows, the MoE's SP gather/split, the
norm's 2 numbers over tp; the router z-loss (its softmax, lse and coefficient kept) at tp 1 and 2; selective
recomputation at tp 1 and 2 (SP). bf16 and fp16 experts (fp32 masters, fp16's loss scaler, gradients reduced
in 2 or 4 bytes): activations, states and log. ZeRO 1-3 at ep 1 (tp 1, and tp 2): states and log.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm
from minitp.nn import AdamW, GPTConfig
from minitp.plan import Choices, Mesh, Model, plan
from minitp.plan.communication import by_group_op, logged_by_group_op as logged
from minitp.plan.experts import kept_counts
from plan_measure import measured_mixed_step, measured_step, mixed_figures, parameter_bytes, saved_by_the_loss
from test_plan import differences

WORLD = MPI.COMM_WORLD


def observed(model, mesh, experts):
    """Choices.routing: per MoE layer, every ep rank's kept pairs per expert (its last forward's)."""
    layers = [module for _, module in model.named_modules() if type(module).__name__ == "MoE"]
    return tuple(tuple(mesh.ep.comm.allgather(kept_counts(layer.routing, experts))) for layer in layers)


def routed_loss(model, mesh, seed):
    """A batch of 2 sequences per dp rank (drawn with ``seed``), the bytes saved around its loss and the
    routing counts that forward observed: (ids, targets, saved, routing)."""
    batch = 2 * mesh.dp_size
    rng = numpy.random.default_rng(seed)
    ids, targets = rng.integers(0, 64, (8, batch)), rng.integers(0, 64, (8, batch))
    saved = saved_by_the_loss(model, mesh, ids, targets)
    return ids, targets, saved, observed(model, mesh, 4)


@pytest.mark.parallel(nprocs=[2, 4])
def test_experts_from_the_routing_counts_are_planned_to_the_byte():
    from minitp.parallel.gpt import ParallelGPT
    from minitp.training import train_step

    failures, checked = [], 0
    cases = [(ep, 1, False, k, capacity, dropout, 0.0, None) for ep in (2, 4) if WORLD.size % ep == 0
             for k, capacity, dropout in ((1, None, 0.0), (2, None, 0.1), (2, 1.0, 0.0))]
    # tp 2 (each expert's f̄/f on its rows; under SP the MoE's g, split and re-gathers), the router z-loss,
    # and selective recomputation (train_gpt.py runs it with experts; full recomputation it refuses)
    cases += [case for case in ((2, 1, False, 2, 1.0, 0.1, 0.01, None), (1, 2, False, 1, None, 0.0, 0.0, None),
                                (1, 2, True, 2, None, 0.1, 0.01, None), (2, 2, False, 1, None, 0.1, 0.0, None),
                                (2, 2, True, 2, 1.0, 0.0, 0.01, None), (2, 1, False, 2, None, 0.1, 0.0, "selective"),
                                (2, 2, True, 2, None, 0.1, 0.0, "selective"))
              if WORLD.size % (case[0] * case[1]) == 0]
    for ep, tp, sp, k, capacity, dropout, z, recompute in cases:
        mesh = comm.init(tp=tp, ep=ep)  # dp = the rest of the world
        config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, experts=4, top_k=k,
                           capacity_factor=capacity, dropout=dropout, z_loss_coef=z, dtype="float32", recompute=recompute)
        model = ParallelGPT(config, mesh, sequence_parallel=sp)
        ids, targets, saved, routed = routed_loss(model, mesh, k)
        with comm.log_collectives() as log:
            train_step(model, AdamW(model.named_parameters()), ids, targets, mesh, max_norm=1.0)
        routed_step = observed(model, mesh, 4)
        shapes, where = Model.of(config), Mesh(dp=mesh.dp_size, ep=ep, tp=tp)

        def planned(routing):
            return plan(shapes, where, Choices(micro_batch=2, routing=routing, ep_rank=mesh.ep.rank,
                                               sequence_parallel=sp, recompute=recompute)).stages[0]

        activations = planned(routed).memory["activations"]
        step = planned(routed_step)
        found = differences(by_group_op(step.messages), logged(log))
        if activations.value != saved:
            found["activations"] = (activations.value, saved)
        unmarked = [m.why for m in step.messages if not m.measured] + ([] if activations.measured else ["activations"])
        ahead = plan(shapes, where, Choices(micro_batch=2, sequence_parallel=sp,
                                            recompute=recompute)).stages[0]  # the even spread
        marked = not ahead.memory["activations"].measured and not any(
            m.measured for m in ahead.messages if m.op == "all_to_all_v" or "local expert" in m.why)
        if found or unmarked or not marked:
            failures.append(((ep, tp, sp, k, capacity, dropout, z, recompute), found, unmarked, marked))
        checked += 1
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
    parallel_assert(checked >= 6)


def test_routing_counts_of_the_wrong_shape_are_refused():
    model = Model(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, experts=4)
    good = (((4, 4, 4, 4), (4, 4, 4, 4)),) * 2
    plan(model, Mesh(dp=2, ep=2), Choices(micro_batch=2, routing=good, ep_rank=1))
    for routing, ep_rank, words in ((good[:1], 0, "per layer"), (good, 2, "ep_rank"),
                                    ((((4, 4, 4, -1), (4, 4, 4, 4)),) * 2, 0, ">= 0")):
        with pytest.raises(ValueError, match=words):
            plan(model, Mesh(dp=2, ep=2), Choices(micro_batch=2, routing=routing, ep_rank=ep_rank))
    with pytest.raises(ValueError, match="one microbatch"):
        plan(model, Mesh(dp=2, ep=2), Choices(micro_batch=2, global_batch=8, routing=good))


# (ep, tp, sp, k, precision, grad_reduce, z_loss_coef): bf16 and fp16 (its loss scaler), dp = the rest
MIXED_CASES = [(2, 1, False, 1, "bf16", "model", 0.0), (2, 1, False, 2, "fp16", "fp32", 0.01),
               (1, 2, True, 2, "fp16", "model", 0.0), (2, 2, True, 2, "bf16", "fp32", 0.01),
               (4, 1, False, 2, "fp16", "model", 0.0)]


@pytest.mark.parallel(nprocs=[2, 4])
def test_experts_in_mixed_precision_are_planned_to_the_byte():
    """bf16 and fp16 experts with fp32 masters (``MasterWeights``, ZeRO 0) and fp16's loss scaler, the
    gradients reduced in the model's dtype or in fp32, over ep and tp: from the routing counts, the 2-byte
    activations (router, gates, aux and z-loss, the experts' rows), the 2-byte parameters, the gradients at
    the end of backward, the fp32 masters and moments, the fp32 gradients the update reads, and the whole
    step's log (2-byte rows on the wire, the experts' buckets over expert_dp in 2 or 4 bytes) -- all marked
    measured."""
    from minitp.parallel.gpt import ParallelGPT

    failures, checked = [], 0
    for ep, tp, sp, k, precision, reduce, z in [case for case in MIXED_CASES if WORLD.size % (case[0] * case[1]) == 0]:
        mesh = comm.init(tp=tp, ep=ep)
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
        config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, experts=4, top_k=k, z_loss_coef=z,
                           dropout=0.1, dtype=dtype)
        model = ParallelGPT(config, mesh, sequence_parallel=sp)
        ids, targets, saved, routed = routed_loss(model, mesh, k)
        step = measured_mixed_step(model, mesh, ids, targets, precision, 0, reduce)
        routed_step = observed(model, mesh, 4)
        shapes, where = Model.of(config), Mesh(dp=mesh.dp_size, ep=ep, tp=tp)

        def planned(routing):
            return plan(shapes, where, Choices(micro_batch=2, routing=routing, ep_rank=mesh.ep.rank,
                                               sequence_parallel=sp, precision=precision, grad_reduce=reduce,
                                               bucket_bytes=2048)).stages[0]

        stage = planned(routed_step)
        final = stage.temporaries.get("fp32 gradients")
        found = {key: pair for key, pair in {
            "activations": (planned(routed).memory["activations"].value, saved),
            "parameters": (stage.memory["parameters"].value, parameter_bytes(model, step.optimizer)),
            **mixed_figures(stage, step, 0, mesh.dp.rank, dtype)}.items() if pair[0] != pair[1]}
        found.update(differences(by_group_op(stage.messages), step.collectives))
        unmarked = [key for key, figure in list(stage.memory.items()) + [("fp32 gradients", final)]
                    if figure is not None and not figure.measured]
        unmarked += [m.why for m in stage.messages if not m.measured]
        if found or unmarked or not numpy.isfinite(step.norm):
            failures.append(((ep, tp, sp, k, precision, reduce, z), found, unmarked, step.norm))
        checked += 1
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
    parallel_assert(checked >= 3)


@pytest.mark.parallel(nprocs=[2, 4])
def test_experts_under_zero_are_planned_to_the_byte():
    """ZeRO 1, 2 and 3 with experts at ep 1 (train_gpt.py refuses ZeRO with ep > 1): the rank's parameters
    (ZeRO-3: its unit slices), the gradients at the end of backward, the optimizer state per dp rank and the
    whole step's log (the experts in the ordinary buckets and units, the norm's one number over tp) equal the
    plan's from the routing counts, every figure marked measured; tp 2 with SP at 4 ranks."""
    from minitp.parallel.data.zero import ZeroOptimizer
    from minitp.parallel.data.zero3 import FullyShardedOptimizer
    from minitp.parallel.gpt import ParallelGPT

    failures, checked = [], 0
    for tp, sp, zero in [case for case in ((1, False, 1), (1, False, 3), (2, True, 2), (2, False, 3))
                         if WORLD.size % (2 * case[0]) == 0]:
        mesh = comm.init(tp=tp)
        config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, experts=4, top_k=2, dropout=0.1,
                           dtype="float32")
        model = ParallelGPT(config, mesh, sequence_parallel=sp)
        ids, targets, saved, routed = routed_loss(model, mesh, zero)
        optimizer = AdamW(model.named_parameters())
        optimizer = (FullyShardedOptimizer(optimizer, model, mesh) if zero == 3 else
                     ZeroOptimizer(optimizer, mesh, 2048, stage=zero))
        measured = measured_step(model, optimizer, ids, targets, mesh)
        shapes, where = Model.of(config), Mesh(dp=mesh.dp_size, tp=tp)

        def planned(routing):
            return plan(shapes, where, Choices(micro_batch=2, routing=routing, sequence_parallel=sp, zero=zero,
                                               bucket_bytes=2048)).stages[0]

        step = planned(observed(model, mesh, 4))
        found = {key: pair for key, pair in {
            "activations": (planned(routed).memory["activations"].value, saved),
            "parameters": (step.memory["parameters"].value, parameter_bytes(model, optimizer)),
            "gradients": (step.memory["gradients"].value, measured.seen["gradients"]),
            "optimizer state": (step.optimizer_state_of(mesh.dp.rank), optimizer.state_bytes())}.items()
            if pair[0] != pair[1]}
        found.update(differences(by_group_op(step.messages), measured.collectives))
        unmarked = [key for key, figure in step.memory.items() if not figure.measured]
        unmarked += [m.why for m in step.messages if not m.measured]
        if found or unmarked:
            failures.append(((tp, sp, zero), found, unmarked))
        checked += 1
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
    parallel_assert(checked >= 2)
