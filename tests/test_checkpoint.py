"""minitp.checkpoint: one full file from any mesh, resumed on any other mesh with the same losses; every
mismatch refused on every rank, naming the culprit; a failed save leaves the previous checkpoint.

World rank 0 writes and reads the file, so only its path matters: tests take rank 0's temporary path.
"""
import os
import zipfile

import numpy
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

from minitp import checkpoint, comm
from minitp.nn import GPT, AdamW, GPTConfig
from minitp.training import train_step
from minitp.parallel.gpt import ParallelGPT

WORLD = MPI.COMM_WORLD
RESUME = 1e-9  # float64, a few AdamW steps after different sums: rounding only
CONFIG = dict(vocab=24, seq_len=8, hidden=16, heads=4, layers=2, dropout=0.1, seed=1, dtype=numpy.float64)
STEPS, SAVED_AT = 6, 3


def batch_at(step):
    """The global batch of step ``step``: a pure function of the step, as in tutorials/train_gpt.py."""
    windows = numpy.random.default_rng([7, step]).integers(0, CONFIG["vocab"], (CONFIG["seq_len"] + 1, 4))
    return windows[:-1], windows[1:]


def train(model, optimizer, mesh, first, last):
    return [train_step(model, optimizer, *batch_at(step), mesh, max_norm=0.5)[0] for step in range(first, last)]


def parallel(mesh, sequence_parallel=False):
    model = ParallelGPT(GPTConfig(**CONFIG), mesh, sequence_parallel=sequence_parallel)
    return model, AdamW(model.named_parameters(), lr=1e-2)


def serial():
    model = GPT(GPTConfig(**CONFIG))
    return model, AdamW(model.named_parameters(), lr=1e-2)


def rank0_path(tmp_path, name="gpt.npz"):
    return WORLD.bcast(str(tmp_path / name), root=0)


def error_of(kind, fn):
    """The message of the ``kind`` exception ``fn()`` raised on this rank, or None."""
    try:
        fn()
    except kind as error:
        return str(error)
    return None


@pytest.mark.parallel(nprocs=[2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_saved_on_one_mesh_resumes_on_another_with_the_same_losses(tmp_path, sequence_parallel):
    path = rank0_path(tmp_path)
    uninterrupted = train(*serial(), None, 0, STEPS)  # every rank runs the serial reference

    mesh = comm.init(tp=WORLD.size)  # save at tp = 4 (or 2)
    model, optimizer = parallel(mesh, sequence_parallel)
    before = train(model, optimizer, mesh, 0, SAVED_AT)
    checkpoint.save(path, model, optimizer, mesh, step=SAVED_AT)

    mesh = comm.init(tp=WORLD.size // 2, dp=2)  # resume at tp = 2 (or 1) × dp = 2, the other SP setting
    model, optimizer = parallel(mesh, not sequence_parallel)
    step = checkpoint.load(path, model, optimizer, mesh)
    resumed = train(model, optimizer, mesh, step, STEPS)

    model, optimizer = serial()  # and serially
    step_serial = checkpoint.load(path, model, optimizer)
    resumed_serially = train(model, optimizer, None, step_serial, STEPS)

    parallel_assert(step == step_serial == SAVED_AT, f"the saved step: {step}, {step_serial}")
    worst = max(abs(a - b) for a, b in zip(before + resumed, uninterrupted))
    parallel_assert(worst <= RESUME, f"resumed on another mesh: {before + resumed} vs {uninterrupted}")
    worst = max(abs(a - b) for a, b in zip(before + resumed_serially, uninterrupted))
    parallel_assert(worst <= RESUME, f"resumed serially: {before + resumed_serially} vs {uninterrupted}")

    if WORLD.rank == 0:  # a plain npz with the serial names and shapes
        with numpy.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            shapes = {name: npz[name].shape for name in ("wte.weight", "lm_head.weight",
                                                         "optimizer/exp_avg/blocks.1.mlp.fc1.weight")}
    files, shapes = WORLD.bcast((files, shapes) if WORLD.rank == 0 else None, root=0)
    parallel_assert(shapes == {"wte.weight": (24, 16), "lm_head.weight": (16, 24),
                               "optimizer/exp_avg/blocks.1.mlp.fc1.weight": (16, 64)}, str(shapes))
    parallel_assert({"checkpoint/step", "optimizer/step", "dropout/blocks.0.attention.attention_dropout"} <= files,
                    str(sorted(files)))


def rewrite(path, change):
    """On rank 0: replace the checkpoint's arrays by ``change(arrays)`` (a dict), then every rank goes on."""
    if WORLD.rank == 0:
        with numpy.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        with open(path, "wb") as file:
            numpy.savez(file, **change(arrays))
    WORLD.Barrier()


def without(key):
    return lambda arrays: {k: v for k, v in arrays.items() if k != key}


def truncated(path):
    if WORLD.rank == 0:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    WORLD.Barrier()


def corrupted(path):
    """Flip bytes inside the stored data of one array: the zip's CRC no longer matches."""
    if WORLD.rank == 0:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("blocks.0.ln1.bias.npy")
        data = bytearray(open(path, "rb").read())
        middle = member.header_offset + 100  # past the local header, inside the array's bytes
        data[middle:middle + 8] = bytes(8)
        open(path, "wb").write(bytes(data))
    WORLD.Barrier()


CASES = {
    "missing parameter": (lambda path: rewrite(path, without("ln_f.weight")), ["'ln_f.weight'", "missing"]),
    "unexpected name": (lambda path: rewrite(path, lambda a: {**a, "blocks.7.mlp.fc1.weight": a["wte.weight"]}),
                        ["'blocks.7.mlp.fc1.weight'", "unexpected"]),
    "wrong shape": (lambda path: rewrite(path, lambda a: {**a, "blocks.1.attention.qkv.weight": numpy.zeros((16, 36))}),
                    ["'blocks.1.attention.qkv.weight'", "(16, 36)", "(16, 48)"]),
    "optimizer state of a wrong shape": (
        lambda path: rewrite(path, lambda a: {**a, "optimizer/exp_avg_sq/wpe.weight": numpy.zeros((8, 15))}),
        ["'optimizer/exp_avg_sq/wpe.weight'", "(8, 15)"]),
    "missing first moment": (lambda path: rewrite(path, without("optimizer/exp_avg/blocks.0.mlp.fc1.weight")),
                             ["blocks.0.mlp.fc1.weight", "incomplete", "'optimizer/exp_avg/blocks.0.mlp.fc1.weight'"]),
    # the whole state of one parameter gone (both moments and its step): it would restart from zero moments,
    # and the losses drift from the saving run's by 1e-3 within a few steps, with no error
    "missing the whole optimizer state of one parameter": (
        lambda path: rewrite(path, lambda a: {k: v for k, v in a.items()
                                              if not (k.startswith("optimizer/") and k.endswith("/wpe.weight"))}),
        ["'wpe.weight'", "missing", "'optimizer/exp_avg/wpe.weight'"]),
    "an optimizer buffer AdamW does not keep": (
        lambda path: rewrite(path, lambda a: {**a, "optimizer/momentum/wpe.weight": a["wpe.weight"]}),
        ["'optimizer/momentum/wpe.weight'", "unexpected"]),
    "missing dropout counter": (lambda path: rewrite(path, without("dropout/blocks.1.mlp.dropout")),
                                ["'blocks.1.mlp.dropout'"]),
    "pickled object array": (
        lambda path: rewrite(path, lambda a: {**a, "wpe.weight": numpy.array([{}, 1], dtype=object)}),
        ["cannot read", "pickle"]),
    "another architecture, the same shapes": (  # 4 heads of 4 -> 2 heads of 8: every weight fits, the model differs
        lambda path: rewrite(path, lambda a: {**a, "checkpoint/config": numpy.array(
            str(a["checkpoint/config"]).replace('"heads": 4', '"heads": 2'))}),
        ["heads=2", "heads=4"]),
    "missing configuration": (lambda path: rewrite(path, without("checkpoint/config")),
                              ["'checkpoint/config'", "missing"]),
    "truncated file": (truncated, ["cannot read", "truncated"]),
    "corrupt file": (corrupted, ["cannot read"]),
}


@pytest.mark.parallel(nprocs=[1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_that_does_not_fit_is_refused_on_every_rank(tmp_path, case):
    path = rank0_path(tmp_path)
    mesh = comm.init(tp=WORLD.size)
    model, optimizer = parallel(mesh)
    train(model, optimizer, mesh, 0, 1)
    checkpoint.save(path, model, optimizer, mesh, step=1)
    damage, expected = CASES[case]
    damage(path)

    fresh, fresh_optimizer = parallel(mesh)
    weights = {name: p.data.copy() for name, p in fresh.named_parameters()}
    message = error_of(ValueError, lambda: checkpoint.load(path, fresh, fresh_optimizer, mesh))
    parallel_assert(message is not None and all(text in message for text in expected),
                    f"{case}: a ValueError naming {expected}, got: {message}")
    unchanged = all(numpy.array_equal(p.data, weights[name]) for name, p in fresh.named_parameters())
    parallel_assert(unchanged and fresh_optimizer.step_count == 0, "nothing was loaded")


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_missing_checkpoint_is_refused_on_every_rank(tmp_path):
    mesh = comm.init(tp=WORLD.size)
    model, optimizer = parallel(mesh)
    message = error_of(FileNotFoundError, lambda: checkpoint.load(rank0_path(tmp_path, "nowhere.npz"), model,
                                                                 optimizer, mesh))
    parallel_assert(message is not None and "nowhere.npz" in message, f"FileNotFoundError: {message}")


@pytest.mark.parallel(nprocs=[1])
def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "gpt.npz")
    model, optimizer = serial()
    train(model, optimizer, None, 0, 1)
    checkpoint.save(path, model, optimizer, step=1)
    saved = open(path, "rb").read()

    def fail_part_way(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    train(model, optimizer, None, 1, 2)
    monkeypatch.setattr(numpy, "savez", fail_part_way)
    message = error_of(OSError, lambda: checkpoint.save(path, model, optimizer, step=2))
    monkeypatch.undo()
    assert message is not None and "disk full" in message
    assert open(path, "rb").read() == saved, "the previous checkpoint is intact"
    assert os.listdir(tmp_path) == ["gpt.npz"], "no temporary file left behind"
    assert checkpoint.load(path, *serial()) == 1


@pytest.mark.parallel(nprocs=[1, 2])
def test_metadata_must_match_and_a_save_cleans_an_interrupted_ones_leftovers(tmp_path):
    path = rank0_path(tmp_path)
    mesh = comm.init(tp=WORLD.size)
    model, optimizer = parallel(mesh)
    if WORLD.rank == 0:  # what a save killed before its rename leaves behind
        open(path + ".tmp-99999", "wb").write(b"half a checkpoint")
    WORLD.Barrier()
    checkpoint.save(path, model, optimizer, mesh, step=0, metadata={"vocabulary": "abc", "corpus": "sha 1"})
    leftovers = WORLD.bcast(sorted(os.listdir(tmp_path)) if WORLD.rank == 0 else None, root=0)
    parallel_assert(leftovers == ["gpt.npz"], f"the directory holds {leftovers}")
    message = error_of(ValueError, lambda: checkpoint.load(path, model, optimizer, mesh,
                                                           metadata={"vocabulary": "abd", "corpus": "sha 1"}))
    parallel_assert(message is not None and "another vocabulary" in message and "'abd'" in message, f"{message}")
    parallel_assert(checkpoint.load(path, model, optimizer, mesh, metadata={"vocabulary": "abc"}) == 0)


def the_same_everywhere(message):
    """Every rank's message, checked equal: rank 0 decided, every rank raised its verdict."""
    messages = WORLD.allgather(message)
    parallel_assert(all(m == messages[0] for m in messages), f"the ranks disagree: {messages}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_path_that_cannot_be_written_is_refused_before_training(tmp_path):
    """``check_writable`` checks the path ``save`` will write -- a FILE -- with the same one-line ValueError on
    every rank: a missing directory, an existing directory (which passed, and the run ended in IsADirectoryError
    at its save, the training lost), a name ending in '/', a directory that is a file, a pipe."""
    if WORLD.rank == 0:
        os.mkdir(tmp_path / "runs")
        open(tmp_path / "notes.txt", "w").write("a file, not a directory")
        os.mkfifo(tmp_path / "pipe")
    WORLD.Barrier()
    cases = {"no/such/dir/gpt.npz": ["no/such/dir", "does not exist"],
             "runs": ["is a directory", "runs/gpt.npz"],  # the directory a --save DIR names
             "runs/": ["names a directory"],
             "notes.txt/gpt.npz": ["notes.txt is not a directory"],
             "pipe": ["not a regular file"]}
    for name, expected in cases.items():
        path = rank0_path(tmp_path, name.rstrip("/")) + name[len(name.rstrip("/")):]  # pathlib drops a final '/'
        message = error_of(ValueError, lambda: checkpoint.check_writable(path))
        parallel_assert(message is not None and "cannot save a checkpoint" in message and "\n" not in message
                        and all(text in message for text in expected), f"{name}: {expected} in: {message}")
        the_same_everywhere(message)
    checkpoint.check_writable(rank0_path(tmp_path))  # a writable one passes, and leaves nothing behind
    left = WORLD.bcast(sorted(os.listdir(tmp_path)) if WORLD.rank == 0 else None, root=0)
    parallel_assert(left == ["notes.txt", "pipe", "runs"], f"{left}")


@pytest.mark.parallel(nprocs=[1])
def test_save_writes_exactly_the_path_it_was_given(tmp_path):
    """numpy.savez adds '.npz' to a file NAME; save hands it a file object, so the checked path is the written one."""
    path = str(tmp_path / "checkpoint")
    checkpoint.check_writable(path)
    checkpoint.save(path, *serial(), step=0)
    assert os.listdir(tmp_path) == ["checkpoint"]
    assert checkpoint.load(path, *serial()) == 0


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_trace_path_that_cannot_be_written_is_refused_before_training(tmp_path):
    """``comm.check_writable`` (--trace) checks a FILE path too, the same on every rank -- and a pipe nobody reads
    is refused at once instead of blocking rank 0's open, and every rank with it, forever."""
    if WORLD.rank == 0:
        os.mkdir(tmp_path / "runs")
        os.mkfifo(tmp_path / "pipe")
    WORLD.Barrier()
    cases = {"runs": ["is a directory", "runs/trace.json"], "runs/": ["names a directory"],
             "no/such/dir/trace.json": ["does not exist"], "pipe": ["cannot write the trace"]}
    for name, expected in cases.items():
        path = rank0_path(tmp_path, name.rstrip("/")) + name[len(name.rstrip("/")):]  # pathlib drops a final '/'
        message = error_of(ValueError, lambda: comm.check_writable(path, WORLD))
        parallel_assert(message is not None and "cannot write the trace" in message and "\n" not in message
                        and all(text in message for text in expected), f"{name}: {expected} in: {message}")
        the_same_everywhere(message)
