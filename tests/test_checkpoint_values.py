"""Every value a checkpoint holds, at its edge: a negative, zero or huge integer, a NaN or an infinity, a wrong
dtype, a wrong shape, a wrong type. ``load`` refuses each value ``save`` cannot have written with one line
naming the file and the entry -- on every rank -- instead of loading it (a NaN weight trains on as NaN, a
dropped optimizer state restarts from zero moments) or failing later in a numpy traceback (a negative step).

A valid checkpoint is saved serially, one entry is rewritten with numpy, and ``load`` must say which.
"""
import os
import zipfile

import numpy
import pytest
from pytest_mpi import parallel_assert

from minitp import checkpoint, comm
from test_checkpoint import WORLD, error_of, parallel, rank0_path, rewrite, serial, train

P = "blocks.0.mlp.fc1.weight"  # a parameter: (16, 64)
METADATA = {"vocabulary": "abc", "seed": "5"}
INT64_MAX = numpy.iinfo(numpy.int64).max


def saved(path, steps=1):
    """A valid checkpoint at ``path`` (on rank 0) after ``steps`` AdamW steps, with ``METADATA``."""
    if WORLD.rank == 0:
        model, optimizer = serial()
        train(model, optimizer, None, 0, steps)
        checkpoint.save(path, model, optimizer, step=steps, metadata=METADATA)
    WORLD.Barrier()


def loading(path):
    model, optimizer = serial()
    return checkpoint.load(path, model, optimizer, metadata=METADATA)


def like(key, change):
    """The stored array at ``key``, changed: ``change(array)``."""
    return lambda arrays: {**arrays, key: change(arrays[key])}


def put(key, value):
    return lambda arrays: {**arrays, key: value}


def poisoned(value):
    """The array with its first element set to ``value``."""
    def change(array):
        array = array.copy()
        array.flat[0] = value
        return array
    return change


# (the entry that must be named, how the file is changed): each yields exactly one problem
BAD_VALUES = {
    "negative step": ("checkpoint/step", put("checkpoint/step", numpy.int64(-1))),
    "step as a float": ("checkpoint/step", put("checkpoint/step", numpy.float64(3.0))),
    "step as a bool": ("checkpoint/step", put("checkpoint/step", numpy.bool_(True))),
    "step as an array": ("checkpoint/step", put("checkpoint/step", numpy.array([1, 2]))),
    "step as a string": ("checkpoint/step", put("checkpoint/step", numpy.array("1"))),
    "step beyond int64": ("checkpoint/step", put("checkpoint/step", numpy.uint64(2 ** 64 - 1))),
    "negative optimizer step": ("optimizer/step", put("optimizer/step", numpy.int64(-1))),
    "optimizer step as a float": ("optimizer/step", put("optimizer/step", numpy.float32(1))),
    "a parameter's Adam step 0": (f"optimizer/step/{P}", put(f"optimizer/step/{P}", numpy.int64(0))),
    "a negative Adam step": (f"optimizer/step/{P}", put(f"optimizer/step/{P}", numpy.int64(-3))),
    "an Adam step beyond the optimizer's": (f"optimizer/step/{P}", put(f"optimizer/step/{P}", numpy.int64(2))),
    "an Adam step as a float": (f"optimizer/step/{P}", put(f"optimizer/step/{P}", numpy.float64(1))),
    "NaN first moment": (f"optimizer/exp_avg/{P}", like(f"optimizer/exp_avg/{P}", poisoned(numpy.nan))),
    "infinite second moment": (f"optimizer/exp_avg_sq/{P}", like(f"optimizer/exp_avg_sq/{P}", poisoned(numpy.inf))),
    "negative second moment": (f"optimizer/exp_avg_sq/{P}", like(f"optimizer/exp_avg_sq/{P}", poisoned(-1e-12))),
    "integer first moment": (f"optimizer/exp_avg/{P}", like(f"optimizer/exp_avg/{P}", lambda a: a.astype(int))),
    "0-d first moment": (f"optimizer/exp_avg/{P}", put(f"optimizer/exp_avg/{P}", numpy.float64(0))),
    "missing second moment": (f"optimizer/exp_avg_sq/{P}", lambda a: {k: v for k, v in a.items()
                                                                      if k != f"optimizer/exp_avg_sq/{P}"}),
    "missing Adam step": (f"optimizer/step/{P}", lambda a: {k: v for k, v in a.items() if k != f"optimizer/step/{P}"}),
    "an unknown buffer": (f"optimizer/velocity/{P}", put(f"optimizer/velocity/{P}", numpy.zeros((16, 64)))),
    "negative dropout counter": ("dropout/drop", put("dropout/drop", numpy.int64(-1))),
    "dropout counter as a float": ("dropout/drop", put("dropout/drop", numpy.float64(1.5))),
    "dropout counter as an array": ("dropout/drop", put("dropout/drop", numpy.array([1, 1]))),
    "NaN parameter": (P, like(P, poisoned(numpy.nan))),
    "infinite parameter": (P, like(P, poisoned(numpy.inf))),
    "-infinite parameter": (P, like(P, poisoned(-numpy.inf))),
    "integer parameter": (P, like(P, lambda a: a.astype(numpy.int64))),
    "complex parameter": (P, like(P, lambda a: a.astype(complex))),
    "string parameter": (P, like(P, lambda a: a.astype(str))),
    "transposed parameter": (P, like(P, lambda a: a.T.copy())),
    "0-d parameter": (P, put(P, numpy.float64(1.0))),
    "configuration as a number": ("checkpoint/config", put("checkpoint/config", numpy.float64(1.5))),
    "configuration as a JSON list": ("checkpoint/config", put("checkpoint/config", numpy.array("[1, 2]"))),
    "configuration not JSON": ("checkpoint/config", put("checkpoint/config", numpy.array("{"))),
    "configuration as an array of strings": ("checkpoint/config",
                                             like("checkpoint/config", lambda a: numpy.array([str(a)]))),
    # str(numpy.int64(5)) == "5": it matched the string the caller passed, and loaded
    "metadata as a number": ("metadata/seed", put("metadata/seed", numpy.int64(5))),
    "metadata as an array": ("metadata/vocabulary", put("metadata/vocabulary", numpy.array(["abc"]))),
}


@pytest.mark.parallel(nprocs=[1])
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_value_save_cannot_have_written_is_refused_naming_its_entry(tmp_path, case):
    path = str(tmp_path / "gpt.npz")
    saved(path)
    entry, change = BAD_VALUES[case]
    rewrite(path, change)
    message = error_of(ValueError, lambda: loading(path))
    assert message is not None, f"{case}: loaded"
    assert f"'{entry}'" in message and path in message and "\n" not in message, f"{case}: {message}"


# values at their edge that save can write: they load
GOOD_VALUES = {
    "step 0": (put("checkpoint/step", numpy.int64(0)), 0),
    "the largest step": (put("checkpoint/step", numpy.int64(INT64_MAX)), INT64_MAX),
    "an int32 step": (put("checkpoint/step", numpy.int32(7)), 7),
    "a float32 parameter in a float64 model": (like(P, lambda a: a.astype(numpy.float32)), 1),
    "huge finite weights": (like(P, poisoned(1e300)), 1),
    "a zero second moment": (like(f"optimizer/exp_avg_sq/{P}", lambda a: numpy.zeros_like(a)), 1),
    "dropout counter 0": (put("dropout/drop", numpy.int64(0)), 1),
}


@pytest.mark.parallel(nprocs=[1])
@pytest.mark.parametrize("case", list(GOOD_VALUES))
def test_a_value_at_its_edge_that_save_can_write_loads(tmp_path, case):
    path = str(tmp_path / "gpt.npz")
    saved(path)
    change, step = GOOD_VALUES[case]
    rewrite(path, change)
    assert loading(path) == step


def a_directory(path):
    os.remove(path)
    os.mkdir(path)


def a_zip_with(member, data):
    def write(path):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(member, data)
    return write


def bytes_of(data):
    def write(path):
        with open(path, "wb") as file:
            file.write(data)
    return write


def an_npy(path):
    with open(path, "wb") as file:
        numpy.save(file, numpy.zeros(3))


def cut_to(size):
    def cut(path):
        with open(path, "r+b") as file:
            file.truncate(size)
    return cut


# a file that is no checkpoint at all: one line naming it, never a zipfile or numpy traceback
NOT_A_CHECKPOINT = {
    "empty": (bytes_of(b""), "not an .npz archive: it is an empty file"),
    "text": (bytes_of(b"step=3\nweights=...\n"), "not an .npz archive"),
    "a .npy array": (an_npy, "a single .npy array"),
    "the zip header alone": (cut_to(10), "cannot read"),
    "a directory": (a_directory, "is a directory"),
    "a zip of something else": (a_zip_with("notes.txt", "hello"), "'notes.txt' is not a numpy array"),
}


@pytest.mark.parallel(nprocs=[1])
@pytest.mark.parametrize("case", list(NOT_A_CHECKPOINT))
def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line(tmp_path, case):
    path = str(tmp_path / "gpt.npz")
    saved(path)
    damage, expected = NOT_A_CHECKPOINT[case]
    damage(path)
    message = error_of(ValueError, lambda: loading(path))
    assert message is not None and expected in message and path in message, f"{case}: {message}"
    # a zip of another thing lists every missing parameter below its first line; the others are one line
    assert case == "a zip of something else" or "\n" not in message, message


@pytest.mark.parallel(nprocs=[1])
def test_optimizer_state_is_every_parameters_once_stepped_and_nobodys_before(tmp_path):
    """The rule for partial optimizer state: ``save`` before the first step writes none (that loads, and resumes
    exactly); after, every parameter's -- a file with none of it, though ``optimizer/step`` says 1, is refused."""
    before = str(tmp_path / "before.npz")
    model, optimizer = serial()
    checkpoint.save(before, model, optimizer, step=0)
    uninterrupted = train(model, optimizer, None, 0, 3)
    model, optimizer = serial()
    assert checkpoint.load(before, model, optimizer) == 0
    assert train(model, optimizer, None, 0, 3) == uninterrupted

    after = str(tmp_path / "after.npz")
    saved(after)
    rewrite(after, lambda a: {k: v for k, v in a.items() if not k.startswith("optimizer/") or k == "optimizer/step"})
    message = error_of(ValueError, lambda: loading(after))
    assert message is not None and "'optimizer/exp_avg/" in message and "every parameter" in message, message
    model, _ = serial()
    assert checkpoint.load(after, model, metadata=METADATA) == 1, "the weights alone still load"


@pytest.mark.parallel(nprocs=[2])
def test_a_bad_value_is_refused_with_the_same_error_on_every_rank(tmp_path):
    """Rank 0 reads and checks, every rank raises its verdict: nobody waits in a broadcast of the arrays."""
    path = rank0_path(tmp_path)
    mesh = comm.init(tp=WORLD.size)
    model, optimizer = parallel(mesh)
    train(model, optimizer, mesh, 0, 1)
    checkpoint.save(path, model, optimizer, mesh, step=1)
    rewrite(path, put("checkpoint/step", numpy.int64(-1)))
    message = error_of(ValueError, lambda: checkpoint.load(path, *parallel(mesh), mesh))
    messages = WORLD.allgather(message)
    parallel_assert(message is not None and "'checkpoint/step' is -1" in message, f"{message}")
    parallel_assert(all(m == messages[0] for m in messages), f"the ranks disagree: {messages}")
