"""How is a checkpoint read? Rank 0 reads the whole file and checks it against the model (``fit.py``),
broadcasts its verdict and then the arrays, and every rank cuts its own blocks out of them."""
import contextlib
import os

import numpy

from minitp import comm
from minitp.checkpoint.contents import (dropouts, expected_contents, merge_expected, optimizer_parameters,
                                       over_stages, world_comm)
from minitp.checkpoint.fit import PARAMETER_ERRORS_SHOWN, misfits
from minitp.parallel.tensor.shard import split_axis


def load(path, model, optimizer=None, mesh=None, metadata=None, scaler=None):
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``), cut for this rank's place in
    ``mesh``; returns the step stored by ``save``. Call on every rank.

    Rank 0 reads the whole file (``allow_pickle=False``) and checks every entry against the model and
    against what ``save`` can have written (``fit.py``): every parameter present, floating point, of its
    serial shape and finite (a NaN weight is a corrupt file, or a diverged run's); nothing unknown; every
    dropout's counter; the model's configuration and ``metadata`` (what ``save`` was given: e.g. the
    vocabulary); every stored integer -- the step, the counters, the optimizer's step counts -- one
    integer and never negative; and, with ``optimizer``, its state:

    * ``optimizer/step`` 0 (saved before the first step): no parameter's state at all;
    * ``optimizer/step`` n > 0: every optimized parameter's state, whole -- its update count, from 1 to
      n, and each buffer the optimizer keeps (AdamW: ``exp_avg`` and ``exp_avg_sq``, finite, the second
      >= 0) -- and no buffer it does not keep.

    Each buffer is loaded in the dtype the optimizer keeps it in (``optimizer.state_dtype``): the
    parameter's, or for ``MasterWeights`` the master dtype -- its fp32 masters come back exactly, not
    rounded to the fp16 model's dtype, and the parameters are then written from them.

    With ``scaler`` (a ``DynamicLossScaler``), its state too: ``scaler/scale`` one positive finite number,
    ``scaler/clean_steps`` an integer from 0 to below the scaler's ``growth_interval`` (at or beyond it,
    the scale would never grow again), ``scaler/skipped`` an integer >= 0; a file saved without
    ``scaler=`` is refused. Without ``scaler``, the file's scaler state (if any) is not loaded.

    That is what ``save`` writes: a parameter has state from its first update on, and every parameter
    of these models gets a gradient at every step. A parameter whose state is gone would restart from
    zero moments, and the losses would drift from the run that saved it with no error, so such a file
    is refused. (A model with a parameter that never receives a gradient saves no state for it: its
    optimizer cannot resume from the file; load it without ``optimizer``.)

    A mismatch, or a file that is not a readable ``.npz`` (empty, truncated, corrupt, a directory),
    raises ``ValueError`` naming the file and the entry, a missing file ``FileNotFoundError`` -- on
    every rank, since rank 0 broadcasts its verdict before anything else. Nothing is loaded unless
    everything checks.
    """
    world = world_comm(mesh)
    expected = over_stages(expected_contents(model, optimizer, mesh), mesh, merge_expected)
    if expected is not None:  # the first stage, which checks for every stage
        expected["metadata"] = {key: str(value) for key, value in (metadata or {}).items()}
        expected["scaler"] = None if scaler is None else {"growth_interval": scaler.growth_interval}
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
    world_group = mesh.world if mesh is not None else comm.Group(world, "world")
    full = {}
    for key, (shape, dtype) in layout.items():
        array = arrays[key] if arrays is not None else numpy.empty(shape, dtype=dtype)
        # reshaped: a 0-d array (a counter, a step) travels as shape (1,)
        full[key] = comm.broadcast(array, world_group, root=0, tag=f"checkpoint: {key}").reshape(shape)
    _restore(full, model, optimizer, mesh)
    if scaler is not None:  # fit.py checked all three
        scaler.scale, scaler.clean_steps = float(full["scaler/scale"]), int(full["scaler/clean_steps"])
        scaler.skipped = int(full["scaler/skipped"])
    return int(full["checkpoint/step"])


def _read_and_check(path, expected, with_optimizer):
    """(arrays, None) if the file at ``path`` fits the model, else (None, (kind, message))."""
    if not os.path.exists(path):
        return None, ("missing", f"no checkpoint at {path}")
    if os.path.isdir(path):
        return None, ("invalid", f"the checkpoint {path} is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as file:
            start = file.read(6)
        # a zip begins with a local file header (or, holding nothing, with its end record); anything
        # else would reach numpy.load, which tries it as a .npy or a pickle and says so, misleadingly
        if not start.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            what = ("an empty file" if not start else "a single .npy array" if start == b"\x93NUMPY"
                    else f"a file starting {start!r}")
            return None, ("invalid", f"the checkpoint {path} is not an .npz archive: it is {what}")
        with numpy.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}  # read everything now: a bad CRC shows up here
    except Exception as error:  # noqa: BLE001 -- zipfile, pickle refusal, truncation: all "unreadable"
        said = " ".join(str(error).split())  # one line, whatever the library put in its message
        return None, ("invalid", f"cannot read the checkpoint {path}: {type(error).__name__}: {said} "
                                 "(truncated, corrupt, or not an .npz written by minitp.checkpoint.save?)")
    problems = misfits(arrays, expected, with_optimizer)
    if problems:
        shown = problems[:PARAMETER_ERRORS_SHOWN]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        if len(problems) == 1:  # one line
            return None, ("invalid", f"the checkpoint {path} does not fit this model: {problems[0]}")
        return None, ("invalid", f"the checkpoint {path} does not fit this model:\n  "
                                 + "\n  ".join(shown) + more)
    return arrays, None


def _restore(full, model, optimizer, mesh):
    """Cut the full arrays into this rank's shards and load them."""
    group = mesh.tp if mesh is not None else None
    parameters = dict(model.named_parameters())
    whole = getattr(optimizer, "full_parameters", None)  # ZeRO-3: load whole, keep this rank's slices
    with whole(write_back=True) if whole is not None else contextlib.nullcontext():
        model.load_state_dict({name: _block(full[name], p, group) for name, p in parameters.items()})
    for name, dropout in dropouts(model):
        dropout.counter = int(full[f"dropout/{name}"])
    if optimizer is None:
        return
    stored = {}  # parameter name -> {buffer: array}, from the keys optimizer/<buffer>/<name>
    for key, array in full.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "optimizer":
            stored.setdefault(parts[2], {})[parts[1]] = array
    state = {}
    for key, parameter, name in optimizer_parameters(model, optimizer):
        if name in stored:
            state[key] = {buffer: int(array) if buffer == "step" else _block(array, parameter, group)
                          for buffer, array in stored[name].items()}  # whole: fit.py checked it
    optimizer.load_state_dict({"step": int(full["optimizer/step"]), "state": state})


def _block(array, parameter, group):
    """This rank's block of the serial ``array`` (the whole of it for a replicated parameter)."""
    axis = split_axis(parameter)
    if axis is None or group is None:
        return array
    return comm.split(array, group, axis)
