"""minitp.plan against minitp's own measurements, byte for byte, and against the papers' published numbers.

Small scale (1, 2 and 4 ranks): for a grid of ``ParallelGPT`` steps (tp × dp, SP on and off, dropout on and
off, tied and untied, float32 and float64, ZeRO 0-3 with buckets small enough to pad; and mixed precision,
bf16 and fp16 with fp32 masters, ZeRO 0-3, the gradients reduced in the model's dtype or in fp32) the planner's
activation bytes equal ``track_saved`` around the loss, its parameter bytes the arrays the model's
parameters live in (ZeRO-3: the rank's unit slices and the freed parameters' placeholder), its gradient
bytes the ``.grad`` arrays and reduce-scattered slices alive at the end of backward, its optimizer state
the optimizer's (``state_bytes`` for ZeRO 1-3, per dp rank: the padding rule), and its collectives,
grouped by (group, op), the collective log's count, payload and ring bytes of a whole ``train_step``. One layer with selective and full recomputation (``ParallelTransformerBlock``): its
``track_saved`` bytes and its forward + backward collectives. Pipelines (pp 2 and 4, with tp at 4 ranks;
AFAB, 1F1B, interleaved): ``StageRun.peak_held``, ``peak_bytes``, every forward's saved bytes, the
parameters of each stage and the log of forward_backward + the gradient synchronisation and norm; bf16 and
fp16 stages through ``Pipelined`` with master weights (ZeRO 0-2), the loss scaler and the whole step's log.

Large scale: Narayanan et al. 2021 table 1 (parameters), Korthikanti et al. 2022 table 2 (activations),
Rajbhandari et al. 2020 §5.1 (the 7.5B example), Narayanan et al. 2021 eq. (3) (flops).
"""
import itertools
import subprocess
import sys

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import comm, track_saved
from minitp.autograd import Tensor
from minitp.nn import AdamW, GPTConfig
from minitp.plan import Choices, Mesh, Model, plan
from minitp.plan import activations, flops, parameters, schedule, states
from minitp.plan.communication import by_group_op, logged_by_group_op as logged, tensor_parallel
from plan_measure import measured_mixed_step, measured_step, mixed_figures, parameter_bytes, saved_by_the_loss

WORLD = MPI.COMM_WORLD


def differences(predicted, measured):
    return {key: (predicted.get(key), measured.get(key)) for key in set(predicted) | set(measured)
            if predicted.get(key) != measured.get(key)}


# -- small scale: the whole step of ParallelGPT ----------------------------------------------------

# dropout changes no ZeRO byte: stages 2 and 3 run without it only, to keep the grid fast
GRID = [case for case in itertools.product([False, True], [0.0, 0.1], [False, True], ["float32", "float64"],
                                           [0, 1, 2, 3]) if not (case[1] and case[4] >= 2)]


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_parallel_gpt_step_is_planned_to_the_byte():
    from minitp.parallel.data.sync import AllReduceGradients
    from minitp.parallel.gpt import ParallelGPT
    from minitp.parallel.data.zero import ZeroOptimizer
    from minitp.parallel.data.zero3 import FullyShardedOptimizer

    failures, checked = [], 0
    for tp in [t for t in (1, 2, 4) if WORLD.size % t == 0]:
        mesh = comm.init(tp=tp)
        for sp, dropout, tie, dtype, zero in GRID:
            if sp and tp == 1:
                continue
            config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, dropout=dropout, tie_embeddings=tie,
                               dtype=dtype)
            model = ParallelGPT(config, mesh, sequence_parallel=sp)
            batch, bucket = 4, 2048  # buckets of 2 KiB: several per model, padded under ZeRO at dp 4
            rng = numpy.random.default_rng(0)
            ids, targets = rng.integers(0, 64, (8, batch)), rng.integers(0, 64, (8, batch))
            saved = saved_by_the_loss(model, mesh, ids, targets)
            optimizer, gradients = AdamW(model.named_parameters()), None
            if zero == 3:
                optimizer = FullyShardedOptimizer(optimizer, model, mesh)
            elif zero:
                optimizer = ZeroOptimizer(optimizer, mesh, bucket, stage=zero)
            else:
                gradients = AllReduceGradients(model, mesh, bucket)
            step = measured_step(model, optimizer, ids, targets, mesh, gradients)
            state = optimizer.state_bytes()

            predicted = plan(Model.of(config), Mesh(dp=mesh.dp_size, tp=tp),
                             Choices(micro_batch=batch // mesh.dp_size, sequence_parallel=sp, zero=zero,
                                     precision=dtype, bucket_bytes=bucket))
            stage = predicted.stages[0]
            planned_state = stage.optimizer_state_of(mesh.dp.rank) if zero else stage.memory["optimizer state"].value
            found = {"activations": (stage.memory["activations"].value, saved),
                     "parameters": (stage.memory["parameters"].value, parameter_bytes(model, optimizer)),
                     "gradients": (stage.memory["gradients"].value, step.seen["gradients"]),
                     "optimizer state": (planned_state, state)}
            found = {key: pair for key, pair in found.items() if pair[0] != pair[1]}
            found.update(differences(by_group_op(stage.messages), step.collectives))
            if found:
                failures.append(((tp, sp, dropout, tie, dtype, zero), found))
            checked += 1
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
    parallel_assert(checked >= len(GRID) // 2)


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("s", [8, 136])
def test_one_layer_with_recomputation_is_planned_to_the_byte(s):
    """The per-layer count of ``activations.layer_bytes`` (Korthikanti's table 2 as minitp keeps it) and the
    layer's collectives, with no, selective and full recomputation, TP and TP+SP, dropout on; at s = 136 the
    attention runs blockwise (minitp's default from s > 128), keeping O and the lse instead of s×s arrays."""
    from minitp.parallel import ParallelTransformerBlock

    b, h, a = 2, 16, 4
    t = WORLD.size
    group = comm.Group(WORLD.Split(color=0, key=WORLD.rank), "tp")
    model = Model(vocab=64, seq_len=s, hidden=h, heads=a, layers=1, dropout=0.1)
    x_full = numpy.random.default_rng(0).standard_normal((s, b, h)).astype(numpy.float32)
    failures = []
    for sp, recompute in itertools.product([False, True], [None, "selective", "full"]):
        block = ParallelTransformerBlock(h, a, dropout=0.1, attention_dropout=0.1, dtype=numpy.float32,
                                         sequence_parallel=sp, group=group, recompute=recompute)
        x = numpy.ascontiguousarray(comm.split(x_full, group, 0)) if sp else x_full
        with comm.log_collectives() as log:
            with track_saved() as saved:  # the forward's: what is held for backward
                y = block(Tensor(x, requires_grad=True))
            y.backward(numpy.ones_like(y.data))
        choices = Choices(micro_batch=b, sequence_parallel=sp, recompute=recompute)
        mesh = Mesh(tp=t)
        predicted = activations.layer_bytes(model, mesh, choices)
        messages = tensor_parallel(model, mesh, choices, blocks=1, first=False, last=False, m=1)
        diff = differences(by_group_op(messages), logged(log))
        if predicted != saved.total or diff:
            failures.append((sp, recompute, predicted, saved.total, diff))
    group.comm.Free()
    parallel_assert(not failures, f"{failures}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_pipeline_stages_are_planned_to_the_byte():
    from minitp import pipeline
    from minitp.parallel.data.data_parallel import clip_grad_norm
    from minitp.parallel.data.sync import AllReduceGradients

    failures = []
    for pp in [p for p in (2, 4) if WORLD.size % p == 0]:
        tp = WORLD.size // pp
        mesh = comm.init(pp=pp, tp=tp)
        for name, m, v, sp, tie, dropout in [("afab", 4, 1, False, False, 0.1), ("1f1b", 4, 1, tp > 1, True, 0.1),
                                             ("1f1b", 2, 1, False, True, 0.0), ("interleaved", pp, 2, tp > 1, True, 0.1),
                                             ("interleaved", 2 * pp, 2, False, False, 0.0)]:
            config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2 * pp * v, dropout=dropout,
                               tie_embeddings=tie, dtype="float32")
            model = pipeline.PipelineGPT(config, mesh, sp, v)
            batch = 2 * m
            rng = numpy.random.default_rng(0)
            ids, targets = rng.integers(0, 64, (8, batch)), rng.integers(0, 64, (8, batch))
            with comm.log_collectives() as log:
                run = pipeline.forward_backward(model, ids, targets, mesh, name, m)
                AllReduceGradients(model, mesh).finish()  # the tied table over the ends, dp
                clip_grad_norm(model, 1.0, mesh)
            predicted = plan(Model.of(config), Mesh(pp=pp, tp=tp, virtual_stages=v),
                             Choices(micro_batch=batch // m, global_batch=batch, sequence_parallel=sp, schedule=name))
            stage = predicted.stages[mesh.pp_rank]
            chunk_bytes = [stage.activation_per_chunk[k * pp + mesh.pp_rank] for kind, _, k in
                           schedule.order(name, pp, m, v, mesh.pp_rank) if kind == "F"]
            found = {"peak_held": (stage.held, run.peak_held),
                     "peak_bytes": (stage.memory["activations"].value, run.peak_bytes),
                     "saved per forward": (chunk_bytes, run.saved_bytes),
                     "parameters": (stage.memory["parameters"].value, sum(p.data.nbytes for p in model.parameters()))}
            found = {key: pair for key, pair in found.items() if pair[0] != pair[1]}
            found.update(differences(by_group_op(stage.messages), logged(log)))
            if found:
                failures.append(((pp, tp, name, m, v, sp, tie), found))
    parallel_assert(not failures, f"{failures[:3]}")


def _measured_step(model, optimizer, mesh, seq, batch, scaler=None):
    """track_saved around the loss, the gradients alive at the end of backward, the collective log of one
    ``train_step`` with 2 KiB buckets."""
    from minitp.parallel.data.sync import AllReduceGradients

    rng = numpy.random.default_rng(0)
    ids, targets = rng.integers(0, 64, (seq, batch)), rng.integers(0, 64, (seq, batch))
    saved = saved_by_the_loss(model, mesh, ids, targets)
    step = measured_step(model, optimizer, ids, targets, mesh, AllReduceGradients(model, mesh, 2048), scaler=scaler)
    return saved, step.seen["gradients"], step.collectives


@pytest.mark.parallel(nprocs=[2, 4])
def test_context_parallel_step_is_planned_to_the_byte():
    """cp 2 and 4 (with tp 2 at 4 ranks, SP on and off): ring, zigzag and Ulysses, no/selective/full
    recomputation, dropout on; s = 16 (dense cores) and, without recomputation, s = 136 (Ulysses' core on all s
    keys runs blockwise). Ring keeps q, k, v, O and one lse per row; Ulysses the plain core of a/(t·c) heads
    over all s tokens; the cp log: ring 2(c−1) + 4(c−1) blocks in 2c−1 sendrecvs per layer, Ulysses 2
    all-to-alls each way; recomputation re-runs the core's forward collectives in backward."""
    from minitp.parallel.gpt import ParallelGPT

    failures, checked = [], 0
    for cp, tp in [(c, t) for c, t in ((2, 1), (4, 1), (2, 2)) if WORLD.size % (c * t) == 0]:
        mesh = comm.init(tp=tp, cp=cp, dp=WORLD.size // (cp * tp))
        cases = [(kind, sp, seq, recompute) for kind, sp, seq, recompute in
                 itertools.product(["ring", "zigzag", "ulysses"], [False, True], [16, 136], [None, "selective", "full"])
                 if (tp > 1 or not sp) and (seq == 16 or recompute is None)]
        for kind, sp, seq, recompute in cases:
            config = GPTConfig(vocab=64, seq_len=seq, hidden=16, heads=4, layers=2, dropout=0.1, dtype="float32",
                               recompute=recompute)
            model = ParallelGPT(config, mesh, sequence_parallel=sp, context_parallel=kind)
            saved, _, log = _measured_step(model, AdamW(model.named_parameters()), mesh, seq, 4)
            stage = plan(Model.of(config), Mesh(dp=mesh.dp_size, cp=cp, tp=tp),
                         Choices(micro_batch=4 // mesh.dp_size, sequence_parallel=sp, cp_kind=kind, recompute=recompute,
                                 bucket_bytes=2048)).stages[0]
            found = differences(by_group_op(stage.messages), log)
            if stage.memory["activations"].value != saved:
                found["activations"] = (stage.memory["activations"].value, saved)
            if found or not stage.memory["activations"].measured:
                failures.append(((cp, tp, kind, sp, seq, recompute), found))
            checked += 1
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
    parallel_assert(checked >= 9)


# bf16 and fp16 (fp16 with its loss scaler, as train_gpt.py runs them) × ZeRO 0-3 × the gradients reduced in
# the model's dtype or in fp32, dp = the world (tp 1); tp 2 × dp (SP, tied) for a few
MIXED_GRID = [(1, False, False, precision, zero, reduce) for precision, zero, reduce in
              itertools.product(["bf16", "fp16"], [0, 1, 2, 3], ["model", "fp32"])] + \
             [(2, True, True, precision, zero, reduce) for precision, zero, reduce in
              [("fp16", 0, "model"), ("bf16", 1, "fp32"), ("fp16", 2, "fp32"), ("bf16", 3, "model")]]


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_mixed_precision_is_planned_to_the_byte():
    """bf16 and fp16 with fp32 masters and moments, ZeRO 0-3, ``grad_reduce`` "model" and "fp32": the
    2-byte parameters (ZeRO-3: the slices and the placeholder), the gradients at the end of backward, the
    fp32 gradients the update reads (fp16: unscaled by the loss scaler; or reduced in fp32), the fp32
    masters and moments per dp rank (the padding rule), the 2-byte activations and the whole step's log
    (gradients on the wire in 2 or 4 bytes, parameters gathered in 2) -- every figure marked measured."""
    from minitp.parallel.gpt import ParallelGPT

    failures, checked = [], 0
    for tp, sp, tie, precision, zero, reduce in MIXED_GRID:
        if WORLD.size % tp:
            continue
        mesh = comm.init(tp=tp)
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
        config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.1, tie_embeddings=tie,
                           dtype=dtype)
        model = ParallelGPT(config, mesh, sequence_parallel=sp)
        rng = numpy.random.default_rng(0)
        ids, targets = rng.integers(0, 64, (8, 4)), rng.integers(0, 64, (8, 4))
        saved = saved_by_the_loss(model, mesh, ids, targets)
        step = measured_mixed_step(model, mesh, ids, targets, precision, zero, reduce)

        stage = plan(Model.of(config), Mesh(dp=mesh.dp_size, tp=tp),
                     Choices(micro_batch=4 // mesh.dp_size, sequence_parallel=sp, zero=zero, precision=precision,
                             grad_reduce=reduce, bucket_bytes=2048)).stages[0]
        final = stage.temporaries.get("fp32 gradients")
        found = {key: pair for key, pair in {
            "parameters": (stage.memory["parameters"].value, parameter_bytes(model, step.optimizer)),
            "activations": (stage.memory["activations"].value, saved),
            **mixed_figures(stage, step, zero, mesh.dp.rank, dtype)}.items() if pair[0] != pair[1]}
        found.update(differences(by_group_op(stage.messages), step.collectives))
        unmarked = [key for key, figure in list(stage.memory.items()) + [("fp32 gradients", final)]
                    if figure is not None and not figure.measured]
        unmarked += [f"{m.group} {m.op}" for m in stage.messages if not m.measured]
        if found or unmarked or not numpy.isfinite(step.norm):
            failures.append(((tp, sp, tie, precision, zero, reduce), found, unmarked, step.norm))
        checked += 1
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")
    parallel_assert(checked >= 16)


@pytest.mark.parallel(nprocs=[2, 4])
def test_mixed_precision_through_pipeline_stages_is_planned_to_the_byte():
    """bf16 and fp16 ``PipelineGPT`` stages (pp 2; × dp 2 or tp 2 at 4 ranks) through ``Pipelined`` with fp16's
    loss scaler: ``MasterWeights`` at ZeRO 0, ZeRO-1 and -2 with fp32 master slices over dp, the gradients
    reduced in the model's dtype or in fp32 -- the stage's peak activations, parameters, gradients, masters,
    moments, the fp32 gradients the update reads, and the log (2-byte sends, the tied table's all-reduce)."""
    from minitp import pipeline
    from minitp.training import Pipelined

    failures = []
    pp = 2
    for dp in [d for d in (1, 2) if WORLD.size % (pp * d) == 0]:
        tp = WORLD.size // (pp * dp)
        mesh = comm.init(pp=pp, dp=dp, tp=tp)
        for precision, name, m, v, tie, zero, reduce in [("fp16", "1f1b", 4, 1, True, 0, "model"),
                                                         ("bf16", "interleaved", 2, 2, False, 0, "fp32"),
                                                         ("bf16", "afab", 2, 1, True, 1, "model"),
                                                         ("fp16", "1f1b", 2, 1, True, 2, "fp32")]:
            if zero and dp == 1:
                continue
            dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
            config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2 * pp * v, dropout=0.1,
                               tie_embeddings=tie, dtype=dtype)
            model = pipeline.PipelineGPT(config, mesh, False, v)
            batch = 2 * m * dp
            rng = numpy.random.default_rng(0)
            ids, targets = rng.integers(0, 64, (8, batch)), rng.integers(0, 64, (8, batch))
            run = pipeline.forward_backward(model, ids, targets, mesh, name, m)  # the StageRun: what it held
            step = measured_mixed_step(model, mesh, ids, targets, precision, zero, reduce,
                                       forward_backward=Pipelined(name, m))
            stage = plan(Model.of(config), Mesh(dp=dp, pp=pp, tp=tp, virtual_stages=v),
                         Choices(micro_batch=batch // (m * dp), global_batch=batch, schedule=name, zero=zero,
                                 precision=precision, grad_reduce=reduce, bucket_bytes=2048)).stages[mesh.pp_rank]
            found = {key: pair for key, pair in {
                "peak_bytes": (stage.memory["activations"].value, run.peak_bytes),
                "parameters": (stage.memory["parameters"].value, sum(p.data.nbytes for p in model.parameters())),
                **mixed_figures(stage, step, zero, mesh.dp.rank, dtype)}.items() if pair[0] != pair[1]}
            found.update(differences(by_group_op(stage.messages), step.collectives))
            unmarked = [key for key, figure in stage.memory.items() if not figure.measured]
            if found or unmarked or not numpy.isfinite(step.norm):
                failures.append(((dp, tp, precision, name, m, v, tie, zero, reduce), found, unmarked, step.norm))
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_experts_states_are_planned_to_the_byte():
    """Experts over ep (carved out of dp), each split over tp: the rank's parameters (E/ep experts, the
    replicated h×E router), gradients and AdamW state. Without a run's routing counts the activations and the
    all-to-alls are GShard's even spread, formula only (with them: tests/test_plan_experts.py)."""
    from minitp.parallel.gpt import ParallelGPT

    failures = []
    for tp, ep in [(t, e) for t in (1, 2) for e in (1, 2, 4) if WORLD.size % (t * e) == 0]:
        mesh = comm.init(tp=tp, ep=ep)
        for experts, top_k, tie, sp in [(4, 1, False, False), (4, 2, True, tp > 1)]:
            config = GPTConfig(vocab=64, seq_len=8, hidden=16, heads=4, layers=2, experts=experts, top_k=top_k,
                               tie_embeddings=tie, dtype="float32")
            model = ParallelGPT(config, mesh, sequence_parallel=sp)
            optimizer = AdamW(model.named_parameters())
            _, grads, _ = _measured_step(model, optimizer, mesh, 8, 4)
            h, f, V, E = 16, 64, 64, experts  # per block: 4h LayerNorms, attention /t, router hE, E/ep experts /t
            block = 4 * h + (3 * h * h + 3 * h + h * h) // tp + h + h * E + E // ep * ((h * f + f + f * h) // tp + h)
            psi = V // tp * h + 8 * h + 2 * block + 2 * h + (0 if tie else h * V // tp)
            stage = plan(Model.of(config), Mesh(dp=mesh.dp_size, tp=tp, ep=ep),
                         Choices(micro_batch=4 // mesh.dp_size, sequence_parallel=sp)).stages[0]
            state = optimizer.state_bytes()
            found = {key: pair for key, pair in {
                "parameters": (stage.memory["parameters"].value, sum(p.data.nbytes for p in model.parameters()), 4 * psi),
                "gradients": (stage.memory["gradients"].value, grads, 4 * psi),
                "optimizer state": (stage.memory["optimizer state"].value, state, 8 * psi)}.items() if len(set(pair)) > 1}
            if found or not stage.memory["parameters"].measured or stage.memory["activations"].measured:
                failures.append(((tp, ep, experts, top_k, tie, sp), found))
            if ep > 1 and any(message.measured for message in stage.messages if message.op == "all_to_all_v"):
                failures.append(((tp, ep), "the even spread's all-to-alls are marked measured"))
    parallel_assert(not failures, f"planned != measured: {failures[:3]}")


def test_the_schedules_replay_is_minitps_plan():
    """``plan.schedule.order`` and ``held`` are minitp.pipeline.schedules' plans and peaks, action for action."""
    from minitp.pipeline import schedules
    for name, p, m, v in [("afab", 4, 6, 1), ("1f1b", 4, 6, 1), ("1f1b", 4, 2, 1), ("interleaved", 4, 8, 2),
                          ("interleaved", 2, 2, 3), ("interleaved", 4, 4, 2)]:
        for rank in range(p):
            minitp_plan = schedules.plan(name, p, m, v, rank)
            assert [tuple(a) for a in minitp_plan] == schedule.order(name, p, m, v, rank)
            assert schedules.peak_in_flight(minitp_plan) == schedule.held(name, p, m, v, rank)


def test_no_mpi_is_imported():
    code = "import sys, minitp.plan, minitp.plan.search, minitp.plan.report; print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- large scale: the papers' numbers -------------------------------------------------------------

# Narayanan et al. 2021 (arXiv 2104.04473), table 1: (heads, hidden, layers) -> parameters in billions,
# V = 51200, s = 2048. Every one agrees with P = 12lh²(1 + 13/(12h) + (V+s)/(12lh)) at the printed digit.
NARAYANAN_TABLE_1 = [((24, 2304, 24), 1.7), ((32, 3072, 30), 3.6), ((32, 4096, 36), 7.5), ((48, 6144, 40), 18.4),
                     ((64, 8192, 48), 39.1), ((80, 10240, 60), 76.1), ((96, 12288, 80), 145.6),
                     ((128, 16384, 96), 310.1), ((128, 20480, 105), 529.6), ((160, 25600, 128), 1008.0)]


@pytest.mark.parametrize("shape, billions", NARAYANAN_TABLE_1)
def test_narayanan_table_1_parameters(shape, billions):
    a, h, l = shape
    formula = parameters.narayanan_parameters(l, h, 51200, 2048)
    assert round(formula / 1e9, 1) == billions
    # minitp's count, tied head: the formula plus the final LayerNorm's 2h (which the formula leaves out)
    model = Model(vocab=51200, seq_len=2048, hidden=h, heads=a, layers=l, tie_embeddings=True)
    assert parameters.serial_count(model) == round(formula) + 2 * h
    # untied: + Vh for the LM head
    assert parameters.serial_count(Model(vocab=51200, seq_len=2048, hidden=h, heads=a, layers=l)) == \
        round(formula) + 2 * h + 51200 * h


# Korthikanti et al. 2022 (arXiv 2205.05198), table 3: the models (a, h, l, t); s = 2048.
KORTHIKANTI_TABLE_3 = {"22B": (64, 6144, 48, 8), "175B": (96, 12288, 96, 8), "530B": (128, 20480, 105, 8),
                       "1T": (160, 25600, 128, 8)}


@pytest.mark.parametrize("name", KORTHIKANTI_TABLE_3)
def test_korthikanti_table_2_identities(name):
    """Table 2 at e = 2, m = 1 from minitp's count without its departures (LayerNorm 1/std, 1/√d), at the
    models of table 3, b = 1."""
    a, h, l, t = KORTHIKANTI_TABLE_3[name]
    s, b = 2048, 1
    table2 = activations.korthikanti_table2
    assert table2(s, b, h, a, t, True, "selective") == pytest.approx(34 / t * s * b * h)
    assert table2(s, b, h, a, t, False, "full") == 2 * s * b * h
    assert table2(s, b, h, a, 1) == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    model = Model(vocab=51200, seq_len=s, hidden=h, heads=a, layers=l, dropout=0.1)
    for sp, recompute in itertools.product([False, True], [None, "selective"]):
        terms = activations.layer_terms(model, Mesh(tp=t), Choices(micro_batch=b, sequence_parallel=sp,
                                                                   recompute=recompute, precision="bf16",
                                                                   attention="dense"))
        paper_terms = sum(v for k, v in terms.items() if "minitp only" not in k)
        assert paper_terms == pytest.approx(table2(s, b, h, a, t, sp, recompute), rel=1e-12)


@pytest.mark.parametrize("name", KORTHIKANTI_TABLE_3)
def test_korthikanti_abstract_5x_less_activation_memory_and_90_percent_less_recompute_overhead(name):
    """The paper's abstract, at table 3's models (s = 2048, t = 8): sequence parallelism with selective
    recomputation "reduces activation memory by 5x" against tensor parallelism alone, and "execution time
    overhead from activation recomputation by over 90%" against full recomputation. From the planner's
    per-layer terms (the paper's, minitp's departures left out): 6.2x at 22B, 5.4x at 175B, 4.9x at 530B
    and 1T -- 5x where the abstract's headline model is (530B), more where 5as/h is larger; in flops (the
    planner's eq. (3) counts), selective recomputation adds s/(6h + s) of what full recomputation adds:
    94.7% less at 22B, 98.4% less at 530B."""
    a, h, l, t = KORTHIKANTI_TABLE_3[name]
    s = 2048
    model = Model(vocab=51200, seq_len=s, hidden=h, heads=a, layers=l, dropout=0.1)

    def per_layer(sp, recompute):
        terms = activations.layer_terms(model, Mesh(tp=t), Choices(micro_batch=1, sequence_parallel=sp,
                                                                   recompute=recompute, precision="bf16",
                                                                   attention="dense"))
        return sum(v for k, v in terms.items() if "minitp only" not in k)

    ratio = per_layer(False, None) / per_layer(True, "selective")
    expected = (10 + 24 / t + 5 * a * s / (h * t)) / (34 / t)  # table 2's rows, written out
    assert ratio == pytest.approx(expected, rel=1e-12)
    assert round(ratio, 1) == {"22B": 6.2, "175B": 5.4, "530B": 4.9, "1T": 4.9}[name]
    assert round(ratio) >= 5
    counted = flops.model_flops(1, s, l, h, 51200)
    saved = 1 - (counted["selective"] - counted["none"]) / (counted["full"] - counted["none"])
    assert saved == pytest.approx(1 - s / (6 * h + s), rel=1e-12) and saved > 0.9


def test_zero_paper_example():
    """Rajbhandari et al. 2020, §5.1 / figure 1: Ψ = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.9 GB."""
    psi = 7.5e9
    assert [round(states.zero_paper(psi, 64, stage) / 1e9, 1) for stage in range(4)] == [120.0, 31.4, 16.6, 1.9]
    assert states.zero_paper(psi, 64, 0) == 16 * psi
    # the planner's mixed-precision states add up to the paper's figure: one bucket (and unit) of Ψ elements,
    # which 64 divides (no padding); ZeRO-3's placeholder (2 bytes) is all that is left
    one = [parameters.Tensor("blocks.0.mlp.fc1.weight", int(psi), True)]
    for stage in range(4):
        planned = states.model_states(int(psi), one, 64, 0, Choices(zero=stage, precision="bf16",
                                                                       bucket_bytes=2 ** 62))
        total = sum(value for value, _ in planned.values())
        assert total == states.zero_paper(psi, 64, stage) + (2 if stage == 3 else 0)


def test_narayanan_eq3_flops():
    """eq. (3): 96Bslh²(1 + s/(6h) + V/(16lh)) with full recomputation; 72Bslh²(1 + s/(6h) + V/(12lh)) without."""
    B, s, l, h, V = 1536, 2048, 105, 20480, 51200
    counted = flops.model_flops(B, s, l, h, V)
    assert counted["full"] == pytest.approx(flops.narayanan_eq3(B, s, l, h, V), rel=1e-12)
    assert counted["none"] == pytest.approx(72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)), rel=1e-12)


def test_the_zero1_padding_rule():
    """Buckets of 10 and 7 elements over d = 4: ⌈10/4⌉ = 3 -> 3, 3, 3, 1; ⌈7/4⌉ = 2 -> 2, 2, 2, 1."""
    assert [states.zero1_elements([10, 7], 4, r) for r in range(4)] == [5, 5, 5, 2]


def test_command_line_from_the_readme(tmp_path):
    png = tmp_path / "plan.png"
    command = [sys.executable, "-m", "minitp.plan", "--hidden", "8192", "--layers", "80", "--heads", "64", "--seq",
               "4096", "--tp", "8", "--pp", "4", "--dp", "2", "--sp", "--recompute", "selective", "--zero", "1",
               "--dtype", "bf16", "--gpu-memory", "80", "--png", str(png)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    # bf16 with ZeRO-1 on pipeline stages: measured (tests above), no figure marked formula only
    assert "fits: yes" in out and "stage 3" in out and "formula only" not in out
    assert png.stat().st_size > 0
    # fp16 with the gradients reduced in fp32: their fp32 slices at the update, 4 bytes per element on dp
    fp32 = subprocess.run(command[:command.index("bf16")] + ["fp16", "--grad-reduce", "fp32"], capture_output=True,
                          text=True, check=True).stdout
    assert "temporary: fp32 gradients" in fp32 and "temporary: fp32 gradients" not in out
    out = subprocess.run(command[:command.index("--sp")] + ["--gpu-memory", "80"], capture_output=True, text=True,
                         check=True).stdout
    assert "fits: NO" in out and "smallest change that fits:" in out
