"""How is a checkpoint written? Every shard gathered back to its serial array, pipeline stages merged on
the first stage, and world rank 0 writing one ``.npz`` through a temporary file and an atomic rename."""
import contextlib
import glob
import json
import os

import numpy

from minitp import backend, comm
from minitp.checkpoint.contents import (dropouts, merge_arrays, model_config, optimizer_parameters, over_stages,
                                       world_comm)
from minitp.functional.precision import BFLOAT16
from minitp.parallel.tensor.shard import split_axis


def save(path, model, optimizer=None, mesh=None, step=0, metadata=None, scaler=None):
    """Write ``model`` (and ``optimizer``'s state) as one full checkpoint at ``path``; call on every rank.

    ``mesh``: the run's mesh (``None``: a serial model on one process). The shards
    are all-gathered over tp by the first data-parallel replica (the others hold the same values);
    world rank 0 writes. ``OSError`` on every rank if the write fails; the file at ``path`` is then
    the previous checkpoint, untouched. ``metadata``: {key: string} stored beside the model, which
    ``load(..., metadata=)`` requires to match. ``scaler``: a ``DynamicLossScaler`` whose state -- the
    scale S, its clean steps since the last change, the steps it skipped -- is saved too
    (``scaler/<name>``): without it a resumed fp16 run would start from another S and scale differently.

    With ``MasterWeights`` the optimizer's state holds the fp32 masters (``optimizer/master/<name>``) and
    fp32 moments, written in their own dtype: the master weights are what is saved; the parameters are
    written in the model's dtype (the masters rounded).
    """
    arrays = None
    whole = getattr(optimizer, "full_parameters", None)  # ZeRO-3: each dp rank holds 1/d of the parameters
    if optimizer is not None and hasattr(optimizer, "gathered"):
        optimizer = optimizer.gathered()  # ZeRO: each dp rank holds 1/d of the state; every rank gathers
    with whole() if whole is not None else contextlib.nullcontext():  # every rank gathers
        if mesh is None or mesh.dp_rank == 0:
            arrays = over_stages(_gather_everything(model, optimizer, mesh, step), mesh, merge_arrays)
        if arrays is not None:  # the first stage, which holds the merged arrays
            arrays.update({f"metadata/{key}": numpy.array(str(value)) for key, value in (metadata or {}).items()})
            if scaler is not None:  # the same on every rank: its overflow test is ORed over the world
                arrays.update(scaler_arrays(scaler))
    verdict = None
    if world_comm(mesh).Get_rank() == 0:
        verdict = _write_atomically(path, arrays)
    verdict = world_comm(mesh).bcast(verdict, root=0)
    if verdict is not None:
        raise OSError(f"saving the checkpoint {path} failed on rank 0 ({verdict}); "
                      "the previous checkpoint there, if any, is untouched")


def _gather_everything(model, optimizer, mesh, step):
    """{checkpoint key: full numpy array}, on every rank of this tp group."""
    group = mesh.tp if mesh is not None else None
    arrays = {name: _full(p.data, p, group, name) for name, p in model.named_parameters()}
    if optimizer is not None:
        arrays["optimizer/step"] = numpy.int64(optimizer.step_count)
        for key, parameter, name in optimizer_parameters(model, optimizer):
            for buffer, value in optimizer.state.get(key, {}).items():
                if buffer == "step":
                    arrays[f"optimizer/step/{name}"] = numpy.int64(value)
                else:  # in the buffer's own dtype: MasterWeights' fp32 masters and moments stay fp32
                    arrays[f"optimizer/{buffer}/{name}"] = _full(value, parameter, group, f"{buffer} of {name}")
    for name, dropout in dropouts(model):
        arrays[f"dropout/{name}"] = numpy.int64(dropout.counter)
    arrays["checkpoint/step"] = numpy.int64(step)
    config = model_config(model)
    if config is not None:
        arrays["checkpoint/config"] = numpy.array(json.dumps(config))  # a unicode array: no pickle needed
    return arrays


def scaler_arrays(scaler):
    """A loss scaler's state as checkpoint entries: ``scaler/scale`` (float64: every power of two a scaler
    reaches is exact in it), ``scaler/clean_steps`` and ``scaler/skipped`` (int64)."""
    return {"scaler/scale": numpy.float64(scaler.scale), "scaler/clean_steps": numpy.int64(scaler.clean_steps),
            "scaler/skipped": numpy.int64(scaler.skipped)}


def _full(array, parameter, group, name):
    """The serial array from this rank's block of it (an all-gather over tp when the parameter is split)."""
    axis = split_axis(parameter)
    if axis is not None and group is not None:
        array = comm.all_gather(array, group, axis=axis, tag=f"checkpoint: gather {name}")
    return numpy.asarray(backend.to_host(array))


def _portable(array):
    """``array`` as a ``.npy`` can hold it for any reader: a bfloat16 one widened to float32 (exact: every
    bfloat16 is a float32), since ``.npy`` has no bfloat16 and would store its bytes as opaque 2-byte
    voids that ``numpy.load`` cannot read as numbers. ``load`` casts it back to the model's dtype."""
    return array.astype(numpy.float32) if array.dtype == BFLOAT16 else array


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
            numpy.savez(file, **{key: _portable(array) for key, array in arrays.items()})
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


def check_writable(path, mesh=None):
    """``ValueError`` on every rank unless world rank 0 can write a checkpoint FILE at ``path``: call it
    before training, so that a bad ``--save`` fails in a second, not after the run, with the training lost.

    ``save`` writes exactly ``path`` (through a file object: numpy adds no ``.npz``) by writing
    ``path.tmp-<pid>`` beside it and renaming that over ``path``. So: ``path`` must name a file -- not an
    existing directory (the rename would fail with ``IsADirectoryError`` after the training), not a
    name ending in a separator, not a device or a pipe (the rename would replace it); its directory
    must exist and be a directory; and a file must be creatable there, which a probe tries (and
    removes). An existing checkpoint at ``path`` is fine: the rename replaces it. Rank 0 decides and
    broadcasts its verdict, so every rank raises the same one-line error, and none waits in a collective.
    """
    verdict = None
    if world_comm(mesh).Get_rank() == 0:
        verdict = _cannot_write(path)
    verdict = world_comm(mesh).bcast(verdict, root=0)
    if verdict is not None:
        raise ValueError(f"cannot save a checkpoint at {path}: {verdict}")


def _cannot_write(path):
    """Why ``save`` could not write the file ``path``, in a few words; None if it can."""
    path = os.fspath(path)
    if not path or path.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        return "that names a directory, not a file (give the checkpoint's file name, e.g. gpt.npz)"
    if os.path.isdir(path):
        return (f"it is a directory; save writes one file: give its name, e.g. {os.path.join(path, 'gpt.npz')}")
    if os.path.exists(path) and not os.path.isfile(path):
        return "it exists and is not a regular file (a device, a pipe, a socket?)"
    directory = os.path.dirname(path) or "."
    if not os.path.exists(directory):
        return f"the directory {directory} does not exist"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    probe = f"{path}.tmp-{os.getpid()}"  # the temporary save writes, beside the file
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        return f"cannot create a file in {directory}: {type(error).__name__}: {error.strerror or error}"
    return None
