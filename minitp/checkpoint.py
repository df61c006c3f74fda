"""Checkpoints that outlive the mesh: one full, framework-independent file, whatever the run's tp and dp.

``save`` gathers every shard back into the serial model's arrays and writes ONE ``.npz`` -- numpy's zip
of ``.npy`` files, readable with nothing but ``numpy.load`` -- keyed by the serial parameter names::

    wte.weight, blocks.0.attention.qkv.weight, ...      the parameters, full (serial) shapes
    optimizer/step                                      how many steps the optimizer took
    optimizer/<buffer>/<parameter name>                 its per-parameter state (AdamW: exp_avg,
    optimizer/step/<parameter name>                     exp_avg_sq), gathered like the parameter
    dropout/<module name>                               each dropout's call counter (its masks go on
                                                        exactly where they stopped)
    checkpoint/step                                     the training step the caller passed
    checkpoint/config                                   the model's GPTConfig as JSON (models that have one)
    metadata/<key>                                      strings the caller passes (``metadata=``), e.g. the
                                                        vocabulary and a hash of the corpus, checked at load

``load`` cuts the file for any mesh: a checkpoint saved at tp=4 resumes at tp=2, or serially, and takes
exactly the steps the uninterrupted run takes. A ZeRO-1 optimizer (``minitp.parallel.zero``) is saved
full, gathered over dp first, and loaded by keeping each dp rank's slices: the file does not say
whether the run was sharded.

**Pipeline stages** each hold other layers: at save the first stage collects the other stages' arrays
(an mpi4py ``gather`` over pp, pickled in memory; the first stage's copy of a tied table is the one
kept), and at load rank 0 checks the file against every stage's names before anything is cut.

**A checkpoint is data, not code.** It is read with ``allow_pickle=False``: a file holding pickled
objects is refused instead of executed.

**One rank writes, one rank reads.** World rank 0 writes the file (to a temporary name in the same
directory, then ``os.replace``: a rename is atomic, so a save that fails part-way leaves the previous
checkpoint intact) and at load reads it, checks it against the model, and broadcasts its verdict and
then the arrays. Every rank so raises the same error, naming the parameter -- nobody is left waiting in
a collective -- and no other rank needs to see rank 0's filesystem.
"""
import glob
import json
import os

import numpy
from mpi4py import MPI

from minitp import backend, dist
from minitp.nn.layers import Dropout
from minitp.parallel.shard import split_axis

PARAMETER_ERRORS_SHOWN = 8  # a checkpoint of another model fails on every name: show the first few


# -- saving ---------------------------------------------------------------------------------------


def save(path, model, optimizer=None, mesh=None, step=0, metadata=None):
    """Write ``model`` (and ``optimizer``'s state) as one full checkpoint at ``path``; call on every rank.

    ``mesh``: the run's mesh (``None``: a serial model on one process). The shards
    are all-gathered over tp by the first data-parallel replica (the others hold the same values);
    world rank 0 writes. ``OSError`` on every rank if the write fails; the file at ``path`` is then
    the previous checkpoint, untouched. ``metadata``: {key: string} stored beside the model, which
    ``load(..., metadata=)`` requires to match.
    """
    arrays = None
    if optimizer is not None and hasattr(optimizer, "gathered"):
        optimizer = optimizer.gathered()  # ZeRO: each dp rank holds 1/d of the state; every rank gathers
    if mesh is None or mesh.dp_rank == 0:
        arrays = _over_stages(_gather_everything(model, optimizer, mesh, step), mesh, _merge_arrays)
        if arrays is not None:  # the first stage, which holds the merged arrays
            arrays.update({f"metadata/{key}": numpy.array(str(value)) for key, value in (metadata or {}).items()})
    verdict = None
    if _world(mesh).Get_rank() == 0:
        verdict = _write_atomically(path, arrays)
    verdict = _world(mesh).bcast(verdict, root=0)
    if verdict is not None:
        raise OSError(f"saving the checkpoint {path} failed on rank 0 ({verdict}); "
                      "the previous checkpoint there, if any, is untouched")


def _gather_everything(model, optimizer, mesh, step):
    """{checkpoint key: full numpy array}, on every rank of this tp group."""
    group = mesh.tp if mesh is not None else None
    arrays = {name: _full(p.data, p, group, name) for name, p in model.named_parameters()}
    if optimizer is not None:
        arrays["optimizer/step"] = numpy.int64(optimizer.step_count)
        for key, parameter, name in _optimizer_parameters(model, optimizer):
            for buffer, value in optimizer.state.get(key, {}).items():
                if buffer == "step":
                    arrays[f"optimizer/step/{name}"] = numpy.int64(value)
                else:
                    arrays[f"optimizer/{buffer}/{name}"] = _full(value, parameter, group, f"{buffer} of {name}")
    for name, dropout in _dropouts(model):
        arrays[f"dropout/{name}"] = numpy.int64(dropout.counter)
    arrays["checkpoint/step"] = numpy.int64(step)
    config = _config(model)
    if config is not None:
        arrays["checkpoint/config"] = numpy.array(json.dumps(config))  # a unicode array: no pickle needed
    return arrays


def _full(array, parameter, group, name):
    """The serial array from this rank's block of it (an all-gather over tp when the parameter is split)."""
    axis = split_axis(parameter)
    if axis is not None and group is not None:
        array = dist.all_gather(array, group, axis=axis, tag=f"checkpoint: gather {name}")
    return numpy.asarray(backend.to_host(array))


def _write_atomically(path, arrays):
    """Write ``arrays`` to ``path`` through a temporary file and a rename; None, or what went wrong.

    A save killed before its rename leaves its temporary behind (``path.tmp-<pid>``): the next save to
    the same path removes any such leftovers first."""
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
        try:
            os.remove(stale)
        except OSError:
            pass
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as file:  # a file object: savez would add ".npz" to a name
            numpy.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except Exception as error:  # noqa: BLE001 -- every failure becomes the same verdict on every rank
        try:
            os.remove(temporary)
        except OSError:
            pass
        return f"{type(error).__name__}: {error}"
    return None


# -- loading --------------------------------------------------------------------------------------


def check_writable(path, mesh=None):
    """``OSError`` on every rank unless world rank 0 can create a file beside ``path`` (where ``save``
    writes its temporary): call it before training, so that a bad ``--save`` fails in a second, not at
    the end of the run."""
    verdict = None
    if _world(mesh).Get_rank() == 0:
        probe = f"{path}.tmp-{os.getpid()}"
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as error:
            verdict = f"{type(error).__name__}: {error}"
    verdict = _world(mesh).bcast(verdict, root=0)
    if verdict is not None:
        raise OSError(f"cannot save a checkpoint at {path}: {verdict}")


def load(path, model, optimizer=None, mesh=None, metadata=None):
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``), cut for this rank's place in
    ``mesh``; returns the step stored by ``save``. Call on every rank.

    Rank 0 reads the whole file (``allow_pickle=False``) and checks it against the model: every
    parameter present with its serial shape, nothing unknown, the optimizer's state if an optimizer is
    given, every dropout's counter, the model's configuration and ``metadata`` (what ``save`` was
    given: e.g. the vocabulary). A mismatch or an unreadable (truncated, corrupt) file raises
    ``ValueError`` naming the culprit, a missing file ``FileNotFoundError`` -- on every rank, since
    rank 0 broadcasts its verdict before anything else. Nothing is loaded unless everything checks.
    """
    world = _world(mesh)
    expected = _over_stages(_expected(model, optimizer, mesh), mesh, _merge_expected)
    if expected is not None:  # the first stage, which checks for every stage
        expected["metadata"] = {key: str(value) for key, value in (metadata or {}).items()}
    arrays, message = None, None
    if world.Get_rank() == 0:
        arrays, message = _read_and_check(path, expected, optimizer is not None)
    message = world.bcast(message, root=0)
    if message is not None:
        kind, text = message
        raise (FileNotFoundError if kind == "missing" else ValueError)(text)
    # what rank 0 read: the keys (the optimizer's state depends on the run), then each array
    layout = world.bcast({key: (a.shape, a.dtype.str) for key, a in arrays.items()} if arrays else None, root=0)
    # no mesh: a serial model run on every rank (a reference run), which must agree all the same
    world_group = mesh.world if mesh is not None else dist.Group(world, "world")
    full = {}
    for key, (shape, dtype) in layout.items():
        array = arrays[key] if arrays is not None else numpy.empty(shape, dtype=dtype)
        # reshaped: a 0-d array (a counter, a step) travels as shape (1,)
        full[key] = dist.broadcast(array, world_group, root=0, tag=f"checkpoint: {key}").reshape(shape)
    _restore(full, model, optimizer, mesh)
    return int(full["checkpoint/step"])


def _world(mesh):
    return mesh.world.comm if mesh is not None else MPI.COMM_WORLD


def _over_stages(mine, mesh, merge):
    """Every pipeline stage's ``mine`` merged on the first stage (``merge(list in stage order)``); None on
    the others. Without stages, ``mine`` itself."""
    if mesh is None or mesh.pp_size == 1:
        return mine
    stages = mesh.pp.comm.gather(mine, root=0)
    return merge(stages) if stages is not None else None


def _merge_arrays(stages):
    merged = {}
    for arrays in stages:  # stage order: the first stage's tied table and shared counters win
        for key, array in arrays.items():
            merged.setdefault(key, array)
    return merged


def _merge_expected(stages):
    return {"shapes": {name: shape for stage in stages for name, shape in stage["shapes"].items()},
            "optimized": set().union(*(stage["optimized"] for stage in stages)),
            "dropouts": list(dict.fromkeys(name for stage in stages for name in stage["dropouts"])),
            "config": stages[0]["config"], "buffers": stages[0]["buffers"]}


def _expected(model, optimizer, mesh):
    """What the checkpoint must hold for this model: {parameter name: serial shape}, the optimizer's
    parameter names, the dropouts' names."""
    tp = mesh.tp_size if mesh is not None else 1
    shapes = {}
    for name, p in model.named_parameters():
        shape, axis = list(p.shape), split_axis(p)
        if axis is not None:
            shape[axis] *= tp  # the serial shape: t blocks along the split axis
        shapes[name] = tuple(shape)
    optimized = [name for _, _, name in _optimizer_parameters(model, optimizer)] if optimizer is not None else []
    return {"shapes": shapes, "optimized": set(optimized), "dropouts": [name for name, _ in _dropouts(model)],
            "config": _config(model), "buffers": tuple(getattr(optimizer, "state_buffers", ()))}


def _read_and_check(path, expected, with_optimizer):
    """(arrays, None) if the file at ``path`` fits the model, else (None, (kind, message))."""
    if not os.path.exists(path):
        return None, ("missing", f"no checkpoint at {path}")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}  # read everything now: a bad CRC shows up here
    except Exception as error:  # noqa: BLE001 -- zipfile, pickle refusal, truncation: all "unreadable"
        return None, ("invalid", f"cannot read the checkpoint {path}: {type(error).__name__}: {error} "
                                 "(truncated, corrupt, or not an .npz written by minitp.checkpoint.save?)")
    problems = _problems(arrays, expected, with_optimizer)
    if problems:
        shown = problems[:PARAMETER_ERRORS_SHOWN]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        return None, ("invalid", f"the checkpoint {path} does not fit this model:\n  "
                                 + "\n  ".join(shown) + more)
    return arrays, None


def _problems(arrays, expected, with_optimizer):
    """Every way ``arrays`` does not fit the model, one line each, naming the entry."""
    shapes, optimized, dropout_names = expected["shapes"], expected["optimized"], expected["dropouts"]
    problems = []

    def check_array(key, shape, what):
        array = arrays[key]
        if array.dtype.kind != "f":
            problems.append(f"{what} {key!r} holds {array.dtype} values, not floating-point numbers")
        elif array.shape != shape:
            problems.append(f"{what} {key!r} has shape {array.shape} in the checkpoint, {shape} in the model")

    def check_integer(key):
        array = arrays[key]
        if array.shape != () or array.dtype.kind not in "iu":
            problems.append(f"{key!r} must be one integer, the checkpoint holds {array.dtype} of shape {array.shape}")

    for name, shape in shapes.items():
        if name not in arrays:
            problems.append(f"parameter {name!r} is missing")
        else:
            check_array(name, shape, "parameter")
    for name in dropout_names:
        if f"dropout/{name}" not in arrays:
            problems.append(f"the counter of dropout {name!r} (key 'dropout/{name}') is missing")
    if "checkpoint/step" not in arrays:
        problems.append("'checkpoint/step' is missing")
    problems += _config_problems(arrays, expected["config"])
    for key, value in expected.get("metadata", {}).items():
        if f"metadata/{key}" not in arrays:
            problems.append(f"'metadata/{key}' is missing: the checkpoint does not say which {key} it was saved with")
        elif str(arrays[f"metadata/{key}"]) != value:
            problems.append(f"the checkpoint was saved with another {key}: {_shorten(str(arrays[f'metadata/{key}']))} "
                            f"there, {_shorten(value)} here")
    if with_optimizer:
        problems += _optimizer_state_problems(arrays, optimized, expected["buffers"])
    if with_optimizer and "optimizer/step" not in arrays:
        problems.append("the optimizer's state ('optimizer/step') is missing")
    for key in arrays:
        if key in shapes or key == "checkpoint/config" or key.startswith("metadata/"):
            continue
        if key in ("checkpoint/step", "optimizer/step") or key.startswith("dropout/"):
            if key.startswith("dropout/") and key[len("dropout/"):] not in dropout_names:
                problems.append(f"unexpected entry {key!r}: the model has no dropout {key[len('dropout/'):]!r}")
            else:
                check_integer(key)
            continue
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "optimizer":
            _, buffer, name = parts
            if name not in shapes:
                problems.append(f"unexpected entry {key!r}: the model has no parameter {name!r}")
            elif with_optimizer and name not in optimized:
                problems.append(f"unexpected entry {key!r}: the optimizer does not update parameter {name!r}")
            elif buffer == "step":
                check_integer(key)
            else:
                check_array(key, shapes[name], f"optimizer state {buffer} of")
            continue
        problems.append(f"unexpected entry {key!r}: not a parameter of this model")
    return problems


def _optimizer_state_problems(arrays, optimized, buffers):
    """A parameter's optimizer state must be whole or absent: a file holding its second moment but not its
    first would otherwise load, and training would drift from the run that saved it."""
    problems = []
    for name in sorted(optimized):
        needed = [f"optimizer/step/{name}"] + [f"optimizer/{buffer}/{name}" for buffer in buffers]
        present = [key for key in needed if key in arrays]
        if present and len(present) < len(needed):
            missing = ", ".join(repr(key) for key in needed if key not in arrays)
            problems.append(f"the optimizer state of {name!r} is incomplete: {missing} missing")
    return problems


def _shorten(text, width=60):
    return repr(text) if len(text) <= width else repr(text[:width]) + f"... ({len(text)} characters)"


def _restore(full, model, optimizer, mesh):
    """Cut the full arrays into this rank's shards and load them."""
    group = mesh.tp if mesh is not None else None
    parameters = dict(model.named_parameters())
    model.load_state_dict({name: _block(full[name], p, group) for name, p in parameters.items()})
    for name, dropout in _dropouts(model):
        dropout.counter = int(full[f"dropout/{name}"])
    if optimizer is None:
        return
    stored = {}  # parameter name -> {buffer: array}, from the keys optimizer/<buffer>/<name>
    for key, array in full.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "optimizer":
            stored.setdefault(parts[2], {})[parts[1]] = array
    state = {}
    for key, parameter, name in _optimizer_parameters(model, optimizer):
        if name in stored:
            state[key] = {buffer: int(array) if buffer == "step" else _block(array, parameter, group)
                          for buffer, array in stored[name].items()}
            state[key].setdefault("step", 0)
    optimizer.load_state_dict({"step": int(full["optimizer/step"]), "state": state})


def _block(array, parameter, group):
    """This rank's block of the serial ``array`` (the whole of it for a replicated parameter)."""
    axis = split_axis(parameter)
    if axis is None or group is None:
        return array
    return dist.split(array, group, axis)


# -- what the model and the optimizer hold ----------------------------------------------------------


def _optimizer_parameters(model, optimizer):
    """(optimizer key, parameter, model name) for each parameter the optimizer updates. The optimizer may
    key its state by name or by index: the model's name is what the checkpoint uses either way."""
    names = {id(p): name for name, p in model.named_parameters()}
    found = []
    for key, parameter in zip(optimizer.keys, optimizer.params):
        if id(parameter) not in names:
            raise ValueError(f"the optimizer's parameter {key!r} is not a parameter of the model")
        found.append((key, parameter, names[id(parameter)]))
    return found


def _config(model):
    """The model's configuration as a dict (``GPTConfig.to_dict``), or None for a model without one. The
    dtype is left out: a float32 checkpoint may be loaded into a float64 model, and back."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    return {key: value for key, value in config.to_dict().items() if key != "dtype"}


def _config_problems(arrays, expected):
    """How the stored configuration differs from the model's, one line per field."""
    if expected is None:
        return []
    if "checkpoint/config" not in arrays:
        return ["'checkpoint/config' (the model's configuration) is missing"]
    try:
        stored = json.loads(str(arrays["checkpoint/config"]))
    except ValueError:
        return ["'checkpoint/config' is not the JSON of a model configuration"]
    return [f"the checkpoint's model has {key}={stored.get(key)!r}, this model {key}={value!r}"
            for key, value in expected.items() if stored.get(key) != value]


def _dropouts(model):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Dropout)]
