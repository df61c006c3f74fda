"""Mixed precision through ZeRO (issue 24): master weights sharded with the optimizer state, the loss scaler
through any synchronisation, the gradient reduction in the model's dtype or in fp32.

- Exact machinery: with float64 as the "low" precision, float64 masters and a power-of-two scaler, ZeRO
  stages 1, 2 and 3 equal the plain float64 ZeRO step and the serial float64 step (1e-12) over 4 steps,
  the first one skipped on every rank by the scaler (an inf planted in rank 0's gradient: in float64 no
  power-of-two S overflows these gradients).
- Memory, measured per rank, byte for byte the ZeRO paper's mixed-precision formulas (fp16 model, fp32
  masters, K = 12), with sizes where d divides every bucket (no padding, which the paper does not count).
- Wire: the gradients cross in fp16 or bf16 (2 bytes per element) by default, in fp32 (4) with
  reduce_dtype; the parameters are all-gathered in the low precision either way.
- Checkpoints: the fp32 masters are saved, and an fp16 run resumes bit for bit.
- Each check is watched failing on a planted bug.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import Tensor, comm
from minitp.nn import GPT, SGD, AdamW, GPTConfig, Module, Parameter
from minitp.nn.loss_scale import DynamicLossScaler
from minitp.nn.master_weights import MasterWeights
from minitp.parallel import FullyShardedOptimizer, ParallelGPT, ZeroOptimizer
from minitp.parallel.data import buckets, zero
from minitp.parallel.data.sync import AllReduceGradients
from minitp.parallel.tensor.shard import gather_serial_state
from minitp.training import train_step

WORLD = MPI.COMM_WORLD
SAME = 1e-12
# hidden 16: every parameter's size is a multiple of 16, so d = 1, 2, 4 divides every bucket and unit
CONFIG = dict(vocab=32, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.0, seed=7)
LR, MAX_NORM, BUCKET_BYTES = 3e-3, 0.5, 3000


def batch_at(step):
    windows = numpy.random.default_rng([5, step]).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 8))
    return windows[:-1], windows[1:]


def build(stage, mesh, dtype, master_dtype=None, reduce_dtype=None, optimizer=AdamW, before=None, **kwargs):
    """A ParallelGPT on ``mesh`` in ``dtype`` and its ZeRO ``stage`` optimizer (``before(model)`` called in
    between: a hook registered there runs before ZeRO's own)."""
    model = ParallelGPT(GPTConfig(**CONFIG, dtype=dtype), mesh)
    if before is not None:
        before(model)
    inner = optimizer(model.named_parameters(), lr=LR, **kwargs)
    if stage == 3:
        return model, FullyShardedOptimizer(inner, model, mesh, master_dtype=master_dtype, reduce_dtype=reduce_dtype)
    return model, ZeroOptimizer(inner, mesh, BUCKET_BYTES, stage=stage, master_dtype=master_dtype,
                                reduce_dtype=reduce_dtype)


def serial_state(model, optimizer, mesh):
    whole = getattr(optimizer, "full_parameters", None)
    if whole is None:
        return gather_serial_state(model, mesh.tp)
    with whole():
        return gather_serial_state(model, mesh.tp)


# -- (a) exact machinery ---------------------------------------------------------------------------------

def overflow_on_rank_0_at_the_first_step(model):
    """An inf in one gradient of rank 0's first backward -- what an fp16 overflow leaves -- before ZeRO
    packs it. (In float64 a power-of-two S cannot overflow these gradients, all below 1 in size: S·g
    stays under 2^1023; so the overflow is put where fp16's would appear.) Every rank must skip."""
    fired = []

    def poison(p):
        if WORLD.rank == 0 and not fired:
            fired.append(True)
            p.grad = p.grad * numpy.inf
    dict(model.named_parameters())["wpe.weight"].register_post_accumulate_grad_hook(poison)


def scaler():
    """S = 2^10, powers of two (S·g and g/S exact): the skipped first step halves it to 2^9; two clean
    steps grow it to 2^10 = max_scale."""
    return DynamicLossScaler(2.0 ** 10, growth_interval=2, max_scale=2.0 ** 10)


def exact_differences(stage):
    """[failure]: the float64 policy under ZeRO ``stage`` vs the plain float64 ZeRO step and the serial
    step -- losses, parameters, moments, and the masters (equal to the parameters in float64)."""
    mesh = comm.init(dp=WORLD.size)
    model, optimizer = build(stage, mesh, "float64", master_dtype=numpy.float64,
                             before=overflow_on_rank_0_at_the_first_step)
    loss_scaler = scaler()
    mixed = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=MAX_NORM, scaler=loss_scaler)
             for step in range(4)]
    failures = []
    if not (mixed[0][1] == float("inf") and loss_scaler.skipped == 1 and loss_scaler.scale == 2.0 ** 10):
        failures.append(f"stage {stage}: the scaler did not skip exactly the first step: norms "
                        f"{[n for _, n in mixed]}, skipped {loss_scaler.skipped}, S {loss_scaler.scale}")
    state, full = serial_state(model, optimizer, mesh), optimizer.gathered()

    plain_model, plain = build(stage, mesh, "float64")  # the skipped step is not run: batches 1..3
    plain_runs = [train_step(plain_model, plain, *batch_at(step), mesh, max_norm=MAX_NORM) for step in range(1, 4)]
    plain_state, plain_full = serial_state(plain_model, plain, mesh), plain.gathered()

    reference = GPT(GPTConfig(**CONFIG, dtype="float64"))
    adamw = AdamW(reference.named_parameters(), lr=LR)
    serial_runs = [train_step(reference, adamw, *batch_at(step), max_norm=MAX_NORM) for step in range(1, 4)]

    found = {}
    for name, runs in (("plain ZeRO", plain_runs), ("serial", serial_runs)):
        found[f"loss and norm vs {name}"] = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(mixed[1:], runs))
    for key, value in plain_state.items():
        found[f"{key} vs plain ZeRO"] = float(numpy.abs(state[key] - value).max())
        found[f"{key} vs serial"] = float(numpy.abs(state[key] - reference.state_dict()[key]).max())
    for key in full.keys:
        for moment in ("exp_avg", "exp_avg_sq"):
            found[f"{moment} of {key} vs plain ZeRO"] = float(numpy.abs(full.state[key][moment]
                                                                         - plain_full.state[key][moment]).max())
        found[f"master of {key} vs its parameter"] = float(numpy.abs(full.state[key]["master"] - state[key]).max())
    failures += [f"stage {stage}: {what} off by {value:.2e}" for what, value in found.items() if not value <= SAME]
    return failures


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_float64_policy_under_zero_is_the_plain_zero_step_and_the_serial_step(stage):
    failures = exact_differences(stage)
    parallel_assert(not failures, "\n".join(failures[:6]))


@pytest.mark.parallel(nprocs=[2])
def test_planted_the_scaler_does_not_unscale_the_slices(monkeypatch):
    monkeypatch.setattr(zero.ZeroOptimizer, "map_gradients", lambda self, fn: None)
    parallel_assert(exact_differences(1), "the slices left S times too large, yet the comparison passed")


# -- (b) memory: the ZeRO paper's formulas ---------------------------------------------------------------

K = 12  # bytes per parameter of optimizer state: the fp32 master and AdamW's two fp32 moments


def paper(stage, psi, d):
    """The ZeRO paper's bytes per rank, mixed precision (fp16 parameters and gradients), Ψ parameters,
    d = N_d replicas: {component: bytes} summing to 2Ψ + 2Ψ + KΨ/d, 2Ψ + (2+K)Ψ/d, (2+2+K)Ψ/d."""
    return {"parameters": 2 * psi if stage < 3 else 2 * psi // d,
            "gradients": 2 * psi if stage == 1 else 2 * psi // d,
            "optimizer state": K * psi // d}


def measured(stage, steps=2):
    """{component: bytes} this rank holds with an fp16 GPT, fp32 masters and a loss scaler: the
    parameters (stages 1-2: the fp16 arrays; 3: the slices) and the optimizer state after the steps,
    and the gradients at their peak -- at the end of backward (when finish() begins: the .grad arrays
    alive plus the slices reduced), the largest over the steps. Also Ψ and the padding."""
    mesh = comm.init(dp=WORLD.size)
    model, optimizer = build(stage, mesh, "float16", master_dtype=numpy.float32)
    scaler, peaks, finish = DynamicLossScaler(2.0 ** 8), [], optimizer.finish

    def measuring():
        alive = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        peaks.append(alive + sum(g.nbytes for g in optimizer.gradients.grad_shards if g is not None))
        return finish()
    optimizer.finish = measuring
    norms = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=MAX_NORM, scaler=scaler)[1]
             for step in range(steps)]
    held = optimizer.held_bytes() if stage == 3 else sum(p.data.nbytes for p in model.parameters())
    psi = sum(p.size for p in optimizer.params)
    padding = sum(b.padded - b.size for b in optimizer.gradients.buckets)
    return ({"parameters": held, "gradients": max(peaks), "optimizer state": optimizer.state_bytes()},
            psi, padding, norms)


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_rank_holds_the_zero_papers_mixed_precision_bytes(stage):
    found, psi, padding, norms = measured(stage)
    d = WORLD.size
    expected = paper(stage, psi, d)
    total = {1: 2 * psi + 2 * psi + K * psi // d, 2: 2 * psi + (2 + K) * psi // d, 3: (2 + 2 + K) * psi // d}[stage]
    parallel_assert(padding == 0 and psi % d == 0, f"padding {padding} elements: the sizes do not divide by {d}")
    parallel_assert(all(numpy.isfinite(norms)), f"an fp16 step overflowed: norms {norms}")
    parallel_assert(found == expected and sum(found.values()) == total,
                    f"stage {stage}, Ψ = {psi}, d = {d}: measured {found}, the paper {expected} (total {total})")
    if WORLD.rank == 0:
        print(f"\nstage {stage} Ψ={psi} N_d={d}: {found} = {sum(found.values())} B, the paper's {total} B")


@pytest.mark.parallel(nprocs=[2])
def test_planted_last_steps_slices_kept_beside_the_next_backward(monkeypatch):
    """The slices of the step before, alive through the next backward (unscaled: fp32), break stage 1's
    2Ψ of gradients."""
    def zero_grad(self):
        for p in self.params:
            p.grad = None
    monkeypatch.setattr(zero.ZeroOptimizer, "zero_grad", zero_grad)
    found, psi, _, _ = measured(1)
    parallel_assert(found["gradients"] != paper(1, psi, WORLD.size)["gradients"], f"not caught: {found}")


# -- (c) the wire: fp16 or fp32 gradients ----------------------------------------------------------------

def logged_step(kind, reduce_dtype, dtype="float16"):
    """One ``dtype`` step with fp32 masters: ``kind`` is "plain" (AllReduceGradients + MasterWeights) or a
    ZeRO stage; returns the log, the elements each reduced buffer holds (padded), the gradient dtypes left
    and the norm."""
    mesh = comm.init(dp=WORLD.size)
    scaler = DynamicLossScaler(2.0 ** 8)
    if kind == "plain":
        model = ParallelGPT(GPTConfig(**CONFIG, dtype=dtype), mesh)
        optimizer = MasterWeights(AdamW(model.named_parameters(), lr=LR), numpy.float32)
        gradients = AllReduceGradients(model, mesh, BUCKET_BYTES, reduce_dtype=reduce_dtype)
        sizes = [b.padded for b in gradients.buckets.buckets]
    else:
        model, optimizer = build(kind, mesh, dtype, master_dtype=numpy.float32, reduce_dtype=reduce_dtype)
        gradients, sizes = None, [b.padded for b in optimizer.gradients.buckets]
    sync = gradients or optimizer
    left, finish = {}, sync.finish

    def seeing():
        finish()
        left["dtypes"] = {str(g.dtype) for g in sync.final_gradients()}
    sync.finish = seeing
    with comm.log_collectives() as log:
        _, norm = train_step(model, optimizer, *batch_at(0), mesh, max_norm=MAX_NORM, gradients=gradients,
                             scaler=scaler)
    return log, sizes, left["dtypes"], norm


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("kind, low", [("plain", "float16"), (1, "float16"), (2, "float16"), (3, "float16"),
                                       (1, "bfloat16")])
def test_gradients_cross_the_wire_in_the_low_precision_or_in_fp32_and_parameters_in_the_low_precision(kind, low):
    failures, d = [], WORLD.size
    for reduce_dtype, itemsize in ((None, 2), (numpy.float32, 4)):
        log, sizes, dtypes, norm = logged_step(kind, reduce_dtype, low)
        op = "all_reduce" if kind == "plain" else "reduce_scatter"
        records = log.select(op, "gradients")
        # one replica: plain data parallelism reduces nothing; ZeRO's reduce-scatter over one rank is logged
        expected = [] if kind == "plain" and d == 1 else [itemsize * n for n in sizes]
        seen = sorted(r.payload_bytes for r in records)
        wire = {r.dtype for r in records}
        if seen != sorted(expected) or wire - {low if itemsize == 2 else "float32"}:
            failures.append(f"reduce {reduce_dtype}: gradients {seen} B in {wire}, expected {sorted(expected)} B")
        if dtypes != {low if itemsize == 2 else "float32"}:
            failures.append(f"reduce {reduce_dtype}: gradients left in {dtypes}")
        gathered = log.select("all_gather", "parameters")
        if kind != "plain":
            parameters = sum(r.payload_bytes for r in gathered)
            passes = 2 if kind == 3 else 1  # ZeRO-3 gathers every unit in forward and again in backward
            if parameters != passes * 2 * sum(sizes) or {r.dtype for r in gathered} != {low}:
                failures.append(f"reduce {reduce_dtype}: parameters gathered {parameters} B, expected "
                                f"{passes * 2 * sum(sizes)} B in {low}")
        if not numpy.isfinite(norm):
            failures.append(f"reduce {reduce_dtype}: the step overflowed")
    parallel_assert(not failures, f"{kind}: " + "\n".join(failures))


@pytest.mark.parallel(nprocs=[2])
def test_planted_the_reduce_dtype_ignored_when_packing(monkeypatch):
    pack = buckets.Bucket.pack
    monkeypatch.setattr(buckets.Bucket, "pack", lambda self, arrays, dtype=None: pack(self, arrays))
    log, sizes, dtypes, _ = logged_step(1, numpy.float32)
    seen = sorted(r.payload_bytes for r in log.select("reduce_scatter", "gradients"))
    parallel_assert(seen != sorted(4 * n for n in sizes), f"not caught: {seen} B")


# -- (d) the masters keep an update below fp16's resolution ----------------------------------------------

class Product(Module):
    """loss = Σ w·x: the gradient of w is x, whatever w."""

    def __init__(self, n):
        super().__init__()
        self.w = Parameter(numpy.ones(n, dtype=numpy.float16))
        self.x = numpy.ones(n, dtype=numpy.float16)

    def loss(self):
        return (self.w * Tensor(self.x)).sum()


def sub_resolution(stage):
    """fp16 next below 1.0 is 1 - 2^-11: an SGD step of 1e-4 rounds back to 1.0. Ten of them through the
    fp32 master slices must reach 1 - 1e-3, and the fp16 weights follow."""
    mesh = comm.init(dp=WORLD.size)
    model = Product(8)
    optimizer = ZeroOptimizer(SGD(model.named_parameters(), lr=1e-4), mesh, stage=stage, master_dtype=numpy.float32)
    for _ in range(10):
        optimizer.zero_grad()
        optimizer.start_step()
        model.loss().backward()
        optimizer.finish()
        optimizer.step()
    master = optimizer.gathered().state["w"]["master"]
    return (numpy.abs(master - (1 - 10 * 1e-4)).max() < 1e-6 and master.dtype == numpy.float32
            and (model.w.data == master.astype(numpy.float16)).all() and (model.w.data < 1).all()), master


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_the_master_slices_keep_an_update_below_fp16s_resolution(stage):
    kept, master = sub_resolution(stage)
    parallel_assert(kept, f"stage {stage}: master {master}")


@pytest.mark.parallel(nprocs=[2])
def test_planted_masters_not_kept_lose_the_update(monkeypatch):
    def remade(self, state, piece):  # from the rounded fp16 slice at every update
        state["master"] = piece.astype(self.master_dtype)
        return state["master"]
    monkeypatch.setattr(zero.ZeroOptimizer, "_master", remade)
    kept, master = sub_resolution(1)
    parallel_assert(not kept, f"masters remade every step, yet the update was kept: {master}")


# -- refusals and checkpoints ----------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1])
def test_master_weights_wrapper_and_a_scaler_without_masters_are_refused():
    mesh = comm.init(dp=1)
    model = ParallelGPT(GPTConfig(**CONFIG, dtype="float16"), mesh)
    with pytest.raises(ValueError, match="master_dtype="):
        ZeroOptimizer(MasterWeights(AdamW(model.named_parameters())), mesh)
    optimizer = ZeroOptimizer(AdamW(model.named_parameters()), mesh)
    with pytest.raises(ValueError, match="master weights"):
        train_step(model, optimizer, *batch_at(0), mesh, scaler=DynamicLossScaler())


@pytest.mark.parallel(nprocs=[1, 2])
def test_the_state_dict_holds_fp32_masters_and_moments_and_loads_back():
    mesh = comm.init(dp=WORLD.size)
    model, optimizer = build(2, mesh, "float16", master_dtype=numpy.float32)
    train_step(model, optimizer, *batch_at(0), mesh, max_norm=MAX_NORM, scaler=DynamicLossScaler(2.0 ** 8))
    saved = optimizer.state_dict()
    dtypes = {(name, str(a.dtype)) for entry in saved["state"].values() for name, a in entry.items() if name != "step"}
    parallel_assert(dtypes == {("master", "float32"), ("exp_avg", "float32"), ("exp_avg_sq", "float32")}, f"{dtypes}")
    other_model, other = build(2, mesh, "float16", master_dtype=numpy.float32)
    other.load_state_dict(saved)
    again = other.state_dict()
    same = all(numpy.array_equal(again["state"][k][n], a) and again["state"][k][n].dtype == a.dtype
               for k, entry in saved["state"].items() for n, a in entry.items() if n != "step")
    parallel_assert(same, "the loaded state differs from the saved one")
    plain = {"step": saved["step"], "state": {k: {n: a for n, a in e.items() if n != "master"}
                                              for k, e in saved["state"].items()}}
    with pytest.raises(ValueError, match="no master weights"):
        other.load_state_dict(plain)


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("stage", [1, 3])
def test_a_checkpoint_saves_the_fp32_masters_and_resumes_the_fp16_run_exactly(tmp_path, stage):
    """2 steps, saved, loaded into a fresh model and optimizer, a 3rd step: bit for bit the uninterrupted
    run's 3rd step (the masters come back in fp32; rounded fp16 weights would lose their small updates).
    In the file: optimizer/master/<name> in float32, the parameters their fp16 rounding."""
    from minitp import checkpoint
    path = WORLD.bcast(str(tmp_path / "mixed.npz"), root=0)
    mesh = comm.init(dp=WORLD.size)

    def run(first, steps, model, optimizer, loss_scaler):
        return [train_step(model, optimizer, *batch_at(step), mesh, max_norm=MAX_NORM, scaler=loss_scaler)
                for step in range(first, first + steps)]

    model, optimizer = build(stage, mesh, "float16", master_dtype=numpy.float32)
    loss_scaler = DynamicLossScaler(2.0 ** 8)
    run(0, 2, model, optimizer, loss_scaler)
    checkpoint.save(path, model, optimizer, mesh, step=2, scaler=loss_scaler)
    uninterrupted = run(2, 1, model, optimizer, loss_scaler)
    expected = serial_state(model, optimizer, mesh)

    saved = dict(numpy.load(path))
    masters = {key[len("optimizer/master/"):]: a for key, a in saved.items() if key.startswith("optimizer/master/")}
    rounded = all(masters[name].dtype == numpy.float32 and saved[name].dtype == numpy.float16
                  and numpy.array_equal(saved[name], masters[name].astype(numpy.float16)) for name in masters)
    parallel_assert(len(masters) == len(list(model.parameters())) and rounded,
                    f"masters in the file: {sorted((k, str(a.dtype)) for k, a in masters.items())[:3]}")

    model, optimizer = build(stage, mesh, "float16", master_dtype=numpy.float32)
    loss_scaler = DynamicLossScaler(2.0 ** 8)
    first = checkpoint.load(path, model, optimizer, mesh, scaler=loss_scaler)
    resumed = run(first, 1, model, optimizer, loss_scaler)
    state = serial_state(model, optimizer, mesh)
    same = resumed == uninterrupted and all(numpy.array_equal(state[k], v) for k, v in expected.items())
    parallel_assert(first == 2 and same, f"stage {stage}: resumed {resumed} vs {uninterrupted}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_the_float64_policy_under_zero_on_pipeline_stages_is_the_plain_zero_step(stage):
    """pp = 2 where the world allows (dp = the rest), 1F1B over 2 microbatches: ZeRO with float64 masters
    and the scaler (its S seeded into the last stage's backward) equals plain ZeRO on the same mesh."""
    from minitp.pipeline import PipelineGPT
    from minitp.training import Pipelined
    pp = 2 if WORLD.size % 2 == 0 else 1
    mesh = comm.init(dp=WORLD.size // pp, pp=pp)
    runs = []
    for mixed in (False, True):
        model = PipelineGPT(GPTConfig(**{**CONFIG, "dtype": "float64", "layers": 2}), mesh)
        optimizer = ZeroOptimizer(AdamW(model.named_parameters(), lr=LR), mesh, BUCKET_BYTES, stage=stage,
                                  master_dtype=numpy.float64 if mixed else None)
        loss_scaler = scaler() if mixed else None
        losses = [train_step(model, optimizer, *batch_at(step), mesh, max_norm=MAX_NORM, scaler=loss_scaler,
                             forward_backward=Pipelined("1f1b", 2))[0] for step in range(3)]
        runs.append((losses, {name: p.data.copy() for name, p in model.named_parameters()}))
    (plain_losses, plain), (mixed_losses, mixed) = runs
    worst = max([abs(a - b) for a, b in zip(plain_losses, mixed_losses)]
                + [float(numpy.abs(plain[name] - mixed[name]).max()) for name in plain])
    parallel_assert(worst <= SAME, f"pp {pp} stage {stage}: off by {worst:.1e}; losses {mixed_losses} vs {plain_losses}")
