"""Mixed precision and checkpoints (issue 24): ``MasterWeights`` keeps its fp32 masters as optimizer state
(the buffer "master", beside the moments), so ``state_dict`` and ``minitp.checkpoint`` save them --
``optimizer/master/<name>``, fp32 -- and load them back exactly, not rounded to the fp16 model's dtype;
``checkpoint.save/load(..., scaler=)`` carry the loss scaler's state.

- Resume is exact: an fp16 GPT trained k steps with MasterWeights(AdamW) and a DynamicLossScaler, saved,
  loaded into a fresh model, optimizer and scaler, trained n more, equals the uninterrupted k + n run bit
  for bit (losses, norms, weights, masters, the scaler): serially, and on 2 ranks at tp = 2.
- The file holds the masters in fp32 and the parameters in fp16 (the masters rounded).
- What would resume wrongly is refused: a state without masters, a file without the scaler's state, a
  scaler state this scaler can never reach.
"""
import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import checkpoint, comm
from minitp.nn import GPT, SGD, AdamW, GPTConfig, Parameter
from minitp.nn.loss_scale import DynamicLossScaler
from minitp.nn.master_weights import MasterWeights
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.tensor.shard import gather_serial_state, split_axis
from minitp.training import train_step

WORLD = MPI.COMM_WORLD
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.1, seed=2, dtype="float16")
SAVED_AT, STEPS = 3, 8


def batch_at(step):
    windows = numpy.random.default_rng([11, step]).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 4))
    return windows[:-1], windows[1:]


def build(mesh):
    """An fp16 GPT (serial, or tp-sharded on ``mesh``), fp32 masters and moments, a scaler that starts
    high enough for the gradients to overflow in fp16 (steps 0 and 1 skipped, at 2^17 and 2^16; step 2
    clean at 2^15) and grows after 2 clean steps: at the save, S = 2^15 with one clean step counted, so
    a resume that forgot the count would grow S a step late, one that forgot S would start at 2^17."""
    config = GPTConfig(**CONFIG)
    model = GPT(config) if mesh is None else ParallelGPT(config, mesh)
    optimizer = MasterWeights(AdamW(model.named_parameters(), lr=1e-2), numpy.float32)
    return model, optimizer, DynamicLossScaler(2.0 ** 17, growth_interval=2, max_scale=2.0 ** 17)


def train(model, optimizer, scaler, mesh, first, last):
    return [train_step(model, optimizer, *batch_at(step), mesh, max_norm=1.0, scaler=scaler)
            for step in range(first, last)]


def snapshot(model, optimizer, scaler, mesh):
    """(weights, masters, scaler state), the weights and masters gathered to their serial shapes."""
    group = None if mesh is None else mesh.tp
    weights = gather_serial_state(model, group) if group is not None else dict(model.named_parameters())
    weights = {name: numpy.array(getattr(w, "data", w)) for name, w in weights.items()}  # copies: training goes on
    names = dict(zip(optimizer.keys, (name for name, _ in model.named_parameters())))
    masters = {}
    for key, p in zip(optimizer.keys, optimizer.params):
        master = optimizer.master[key]
        if group is not None:
            axis = split_axis(p)
            if axis is not None:
                master = comm.all_gather(master, group, axis=axis)
        masters[names[key]] = numpy.array(master)  # a copy: the state's array moves on with training
    return weights, masters, (scaler.scale, scaler.clean_steps, scaler.skipped)


def rank0_path(tmp_path, name="fp16.npz"):
    return WORLD.bcast(str(tmp_path / name), root=0)


def same(a, b):
    return set(a) == set(b) and all(numpy.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def resume_case(tmp_path, mesh):
    path = rank0_path(tmp_path)
    model, optimizer, scaler = build(mesh)
    uninterrupted = train(model, optimizer, scaler, mesh, 0, STEPS)
    expected = snapshot(model, optimizer, scaler, mesh)

    model, optimizer, scaler = build(mesh)
    before = train(model, optimizer, scaler, mesh, 0, SAVED_AT)
    checkpoint.save(path, model, optimizer, mesh, step=SAVED_AT, scaler=scaler)
    saved = snapshot(model, optimizer, scaler, mesh)
    model, optimizer, scaler = build(mesh)
    step = checkpoint.load(path, model, optimizer, mesh, scaler=scaler)
    loaded = snapshot(model, optimizer, scaler, mesh)
    resumed = train(model, optimizer, scaler, mesh, step, STEPS)
    got = snapshot(model, optimizer, scaler, mesh)

    where = "serial" if mesh is None else f"tp {mesh.tp_size}"
    parallel_assert(step == SAVED_AT, f"{where}: step {step}")
    parallel_assert(before + resumed == uninterrupted, f"{where}: {before + resumed} vs {uninterrupted}")
    parallel_assert(same(got[0], expected[0]), f"{where}: the resumed weights differ")
    parallel_assert(same(got[1], expected[1]), f"{where}: the resumed masters differ")
    parallel_assert(got[2] == expected[2], f"{where}: scaler {got[2]} vs {expected[2]}")
    parallel_assert(same(loaded[0], saved[0]) and same(loaded[1], saved[1]) and loaded[2] == saved[2],
                    f"{where}: the loaded weights, masters or scaler are not the saved ones")
    parallel_assert(saved[2][1] == 1, f"{where}: the scaler at the save {saved[2]}: its clean count is tested")
    # the run exercises the scaler: it skipped (fp16 overflowed from 2^15 up) and it took steps
    skipped = sum(not numpy.isfinite(norm) for _, norm in uninterrupted)
    parallel_assert(0 < skipped < STEPS, f"{where}: {skipped} of {STEPS} steps skipped: {uninterrupted}")

    if WORLD.rank == 0:  # what the file holds: fp32 masters (not their fp16 rounding), fp16 parameters
        with numpy.load(path) as npz:
            masters = {key[len("optimizer/master/"):]: npz[key] for key in npz.files
                       if key.startswith("optimizer/master/")}
            parameters = {name: npz[name] for name in saved[0]}
            moments = [npz[key].dtype for key in npz.files if key.startswith("optimizer/exp_avg")]
        assert same(masters, saved[1]) and all(a.dtype == numpy.float32 for a in masters.values()), where
        assert all(a.dtype == numpy.float16 for a in parameters.values()), where
        assert all(numpy.array_equal(parameters[name], masters[name].astype(numpy.float16)) for name in masters), where
        assert moments and set(moments) == {numpy.dtype(numpy.float32)}, moments
        # the masters carry more than the fp16 weights: the point of saving them
        assert any(not numpy.array_equal(masters[name], parameters[name].astype(numpy.float32))
                   for name in masters), where


@pytest.mark.parallel(nprocs=[1])
def test_an_fp16_run_resumes_bit_for_bit_serially(tmp_path):
    resume_case(tmp_path, None)


@pytest.mark.parallel(nprocs=[2])
def test_an_fp16_run_resumes_bit_for_bit_at_tp_2(tmp_path):
    resume_case(tmp_path, comm.init(tp=2))


def test_the_masters_are_optimizer_state_in_the_master_dtype():
    """state_dict holds fp32 masters and moments; load_state_dict keeps them fp32 (the base class would
    round them to fp16) and writes the parameters from them; a state without masters is refused."""
    w = Parameter(numpy.ones(3, dtype=numpy.float16))
    optimizer = MasterWeights(AdamW([("w", w)], lr=1e-4, weight_decay=0.0), numpy.float32)
    assert optimizer.state_buffers == ("exp_avg", "exp_avg_sq", "master") and optimizer.state_bytes() == 0
    for _ in range(2):  # AdamW moves the master by about lr = 1e-4 a step: 1 - 2e-4 rounds to fp16's 1.0
        w.grad = numpy.full(3, 1.0, dtype=numpy.float16)
        optimizer.step()
    state = optimizer.state_dict()
    master = state["state"]["w"]["master"]
    assert master.dtype == numpy.float32 and (w.data == 1).all() and (master < 1).all()  # below fp16's grid
    assert optimizer.state_bytes() == 3 * 3 * 4  # masters + two moments, fp32: the K = 12 bytes each

    fresh_w = Parameter(numpy.full(3, 7.0, dtype=numpy.float16))
    fresh = MasterWeights(AdamW([("w", fresh_w)], lr=1e-4, weight_decay=0.0), numpy.float32)
    fresh.load_state_dict(state)
    assert all(a.dtype == numpy.float32 for name, a in fresh.state["w"].items() if name != "step")
    assert numpy.array_equal(fresh.state["w"]["master"], master) and (fresh_w.data == 1).all()
    with pytest.raises(ValueError, match="no master weights"):
        fresh.load_state_dict({"step": 1, "state": {"w": {"step": 1, "exp_avg": master, "exp_avg_sq": master}}})


def test_masters_made_at_the_first_update_equal_copies_made_at_construction():
    """Made lazily from the weights (as the moments are), they are the same copies: nothing else changes
    the weights before their first update; ``master`` shows them widened until then."""
    w = Parameter(numpy.array([1.0, 2.0], dtype=numpy.float16))
    optimizer = MasterWeights(SGD([w], lr=1e-4), numpy.float32)
    assert optimizer.state == {} and optimizer.master[0].dtype == numpy.float32
    w.grad = numpy.ones(2, dtype=numpy.float16)
    optimizer.step()
    assert numpy.allclose(optimizer.state[0]["master"], numpy.float32([1.0, 2.0]) - numpy.float32(1e-4))


@pytest.mark.parallel(nprocs=[1])
def test_what_would_resume_wrongly_is_refused(tmp_path):
    model, optimizer, scaler = build(None)
    train(model, optimizer, scaler, None, 0, SAVED_AT)
    with_scaler, without = str(tmp_path / "with.npz"), str(tmp_path / "without.npz")
    checkpoint.save(with_scaler, model, optimizer, step=SAVED_AT, scaler=scaler)
    checkpoint.save(without, model, optimizer, step=SAVED_AT)

    fresh = build(None)
    with pytest.raises(ValueError, match="the loss scaler's state 'scaler/scale' is missing"):
        checkpoint.load(without, fresh[0], fresh[1], scaler=fresh[2])
    short = DynamicLossScaler(growth_interval=1)  # the file's clean_steps is 1: 1 >= 1
    assert scaler.clean_steps == 1
    with pytest.raises(ValueError, match="not below this scaler's growth_interval 1"):
        checkpoint.load(with_scaler, fresh[0], fresh[1], scaler=short)
    # a plain fp16 AdamW's state has no masters: a MasterWeights optimizer cannot resume from it
    plain_model = GPT(GPTConfig(**CONFIG))
    plain = AdamW(plain_model.named_parameters(), lr=1e-2, eps=1e-3)  # 1e-8 is 0 in fp16: x / 0
    train_step(plain_model, plain, *batch_at(0))
    plain_path = str(tmp_path / "plain.npz")
    checkpoint.save(plain_path, plain_model, plain, step=1)
    with pytest.raises(ValueError, match="'optimizer/master/blocks.0.attention.proj.bias' missing"):
        checkpoint.load(plain_path, fresh[0], fresh[1])
    # and the masters' file into a plain optimizer: a buffer it does not keep
    with pytest.raises(ValueError, match="keeps no buffer 'master'"):
        checkpoint.load(with_scaler, plain_model, plain)
    # without scaler=, the file's scaler state is not loaded, and the rest loads
    assert checkpoint.load(with_scaler, fresh[0], fresh[1]) == SAVED_AT and fresh[2].scale == 2.0 ** 17


@pytest.mark.parallel(nprocs=[2])
def test_zeros_fp32_master_slices_are_the_same_file_and_load_into_master_weights(tmp_path):
    """ZeRO-1 with ``master_dtype`` keeps each rank's slice of the masters as the same state buffer
    "master": gathered at save, the file holds the same fp32 ``optimizer/master/<name>`` as
    MasterWeights', and a serial MasterWeights resumes from it with those masters exactly."""
    from minitp.parallel.data.zero import ZeroOptimizer

    path = rank0_path(tmp_path, "zero_fp16.npz")
    mesh = comm.init(dp=2)
    model = ParallelGPT(GPTConfig(**CONFIG), mesh)
    optimizer = ZeroOptimizer(AdamW(model.named_parameters(), lr=1e-2), mesh, master_dtype=numpy.float32)
    scaler = DynamicLossScaler(2.0 ** 17, growth_interval=2, max_scale=2.0 ** 17)
    train(model, optimizer, scaler, mesh, 0, SAVED_AT)
    checkpoint.save(path, model, optimizer, mesh, step=SAVED_AT, scaler=scaler)
    full = optimizer.state_dict()["state"]  # collective: every rank gathers
    masters = {name: full[name]["master"] for name, _ in model.named_parameters()}

    serial, serial_optimizer, serial_scaler = build(None)
    checkpoint.load(path, serial, serial_optimizer, scaler=serial_scaler)
    loaded = serial_optimizer.master
    parallel_assert(same(loaded, masters) and all(a.dtype == numpy.float32 for a in loaded.values()),
                    "the ZeRO masters, loaded into MasterWeights, are not the saved ones")
    parallel_assert(all(numpy.array_equal(p.data, masters[name].astype(numpy.float16))
                        for name, p in serial.named_parameters()), "the weights are the masters rounded")
    parallel_assert((serial_scaler.scale, serial_scaler.clean_steps) == (scaler.scale, scaler.clean_steps),
                    "the scaler's state")
