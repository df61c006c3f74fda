"""tutorials/train_gpt.py in mixed precision (issue 24): ``--dtype fp16`` and ``bf16`` train and ``--check``
holds on tp 2 × dp 2, pp 2 × dp 2 and with ZeRO, within the bound its section 5 derives (4 u of the
serial value, u = 2^-11 for fp16, 2^-8 for bf16); a planted sum over dp instead of the mean is far
outside it; and an fp16 run saved mid-way resumes exactly (the fp32 masters and the loss scale are in
the checkpoint)."""
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import checkpoint, comm
from test_train_gpt import tutorial

WORLD = MPI.COMM_WORLD
TINY = ["--hidden", "16", "--layers", "2", "--heads", "4", "--seq", "8", "--batch", "4", "--sample", "0",
        "--eval-every", "0", "--log-every", "100"]

# the meshes (4 ranks): tp 2 × dp 2, pp 2 × dp 2, and ZeRO -- stage 1 over tp 2 × dp 2, stage 3
# over dp 4 (the fp16 scaler's replicas each hold a quarter of the batch: train_gpt.py section 5)
MESHES = [dict(tp=2, dp=2), dict(pp=2, dp=2, microbatches=2), dict(tp=2, dp=2, zero=1), dict(dp=4, zero=3)]


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_check_holds_in_the_mixed_precision_policy(dtype):
    train_gpt = tutorial()
    for mesh in MESHES:
        args = train_gpt.check_args(dtype=dtype, **mesh)
        result = train_gpt.check(args, comm.init(tp=mesh.get("tp", 1), dp=mesh["dp"], pp=mesh.get("pp", 1)))
        parallel_assert(result.unit == {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[dtype], f"{result.unit}")
        parallel_assert(result.passed and result.worst_in_units <= train_gpt.LOW_PRECISION_BOUND,
                        f"{dtype} {mesh}: {result.worst_in_units:.2f} u: {result}")
        parallel_assert(len(set(result.serial)) >= 5, f"the losses move: the check compares something: {result}")
        parallel_assert(result.max_difference > 0, f"{dtype} is not float64: some rounding differs: {result}")


@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_bound_catches_gradients_summed_over_dp(dtype, monkeypatch):
    """The low-precision bound is loose enough for rounding, not for a bug: the gradients summed over
    the 2 replicas instead of averaged double every norm -- ~2^10 u in fp16, ~2^7 u in bf16."""
    train_gpt = tutorial()
    real_all_reduce = comm.all_reduce
    monkeypatch.setattr(comm, "all_reduce", lambda x, group, tag="", op="sum", out=None:
                        real_all_reduce(x, group, tag, op, out) * (group.size if tag.startswith("gradients") else 1))
    result = train_gpt.check(train_gpt.check_args(1, 2, dtype=dtype), comm.init(dp=2))
    parallel_assert(not result.passed and result.worst_in_units > 50, f"{result.worst_in_units:.1f} u: {result}")


@pytest.mark.parallel(nprocs=[4])
def test_the_command_line_says_ok_in_bf16(capsys):
    train_gpt = tutorial()
    status = train_gpt.main(["--dtype", "bf16", "--tp", "2", "--dp", "2", "--check"])
    out = capsys.readouterr().out
    parallel_assert(status == 0, f"exit {status}")
    if WORLD.rank == 0:  # rank 0 says it
        assert "bf16 (fp32 master weights and moments)" in out and "OK: the largest difference" in out, out
        assert "u = 2^-8 (bound 4 u" in out, out


class Stop(Exception):
    pass


@pytest.mark.parallel(nprocs=[1, 2])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_mixed_precision_run_saved_midway_resumes_exactly(tmp_path, dtype):
    """6 steps (dropout; fp16: a loss scale that grows) against 3, a checkpoint, and 3 more from it: the
    same losses and norms, bit for bit. On 2 ranks: ZeRO-1 over dp 2 (the masters are slices, gathered
    into the file). bf16 parameters are written as float32 (.npy has no bfloat16) and cast back."""
    train_gpt = tutorial()
    path = str(WORLD.bcast(str(tmp_path / f"{dtype}.npz")))
    argv = TINY + ["--dtype", dtype, "--steps", "6", "--dropout", "0.1", "--dp", str(WORLD.size)]
    if WORLD.size > 1:
        argv += ["--zero", "1"]
    mesh = comm.init(dp=WORLD.size)

    def prepared(*extra):
        args = train_gpt.parse(argv + list(extra))
        return args, train_gpt.setup(args, mesh)

    def growing(scaler):  # fp16: the scale grows during the run (2^10 doubling every 2 clean steps)
        if scaler is not None:
            scaler.scale, scaler.growth_interval = 2.0 ** 10, 2

    args, whole = prepared()
    growing(whole.scaler)
    uninterrupted = train_gpt.train(whole.model, whole.optimizer, whole.gradients, whole.data, args, mesh,
                                    scaler=whole.scaler)

    args, first = prepared()
    growing(first.scaler)

    def save_after_three(step, *_):
        if step == 2:
            checkpoint.save(path, first.model, first.optimizer, mesh, step=3, scaler=first.scaler,
                            metadata=train_gpt.metadata(first.characters, first.text))
            raise Stop

    with pytest.raises(Stop):
        train_gpt.train(first.model, first.optimizer, first.gradients, first.data, args, mesh, report=save_after_three,
                        scaler=first.scaler)
    args, resumed = prepared("--load", path)
    parallel_assert(resumed.first_step == 3, f"{resumed.first_step}")
    if dtype == "fp16":  # its state matters at the resume
        parallel_assert(resumed.scaler.scale == first.scaler.scale == 2.0 ** 11,
                        f"{resumed.scaler.scale} {first.scaler.scale}")
        resumed.scaler.growth_interval = 2
    else:
        parallel_assert(resumed.scaler is None and first.scaler is None, "bf16 scales no loss")
    rest = train_gpt.train(resumed.model, resumed.optimizer, resumed.gradients, resumed.data, args, mesh,
                           first_step=resumed.first_step, scaler=resumed.scaler)
    parallel_assert(rest[0] == uninterrupted[0][3:] and rest[1] == uninterrupted[1][3:],
                    f"{rest} vs {uninterrupted}")
