"""Measuring one step for the planner's tests (tests/test_plan*.py): the bytes ``track_saved`` sees around the
loss, the parameters' arrays, the gradients alive at the end of backward and those the update reads, the
optimizer's masters and moments, and the collective log of one whole ``train_step`` -- what the tests compare
with the plan, byte for byte."""
from types import SimpleNamespace

import numpy

from minitp import comm, track_saved
from minitp.nn import AdamW
from minitp.plan.communication import logged_by_group_op as logged


def _root(array):
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


def parameter_bytes(model, optimizer):
    """Bytes of the arrays the parameters' values live in (each counted once), plus ZeRO-3's slices."""
    owners = {id(_root(p.data)): _root(p.data).nbytes for p in model.parameters()}
    shards = getattr(getattr(optimizer, "gradients", None), "shards", None) or []
    return sum(owners.values()) + sum(a.nbytes for a in shards)


def measure_gradients_at_finish(model, sync, seen):
    """Wrap ``sync.finish`` (called once backward is over): record the gradient bytes alive then."""
    finish = sync.finish

    def measured():
        grads = {id(p.grad): p.grad.nbytes for p in model.parameters() if p.grad is not None}
        shards = getattr(getattr(sync, "gradients", None), "grad_shards", None) or []
        seen["gradients"] = sum(grads.values()) + sum(a.nbytes for a in shards if a is not None)
        return finish()
    sync.finish = measured


def watch_the_update(model, optimizer, zero, seen):
    """Wrap ``optimizer.step``: record the bytes and dtypes of the gradients the update reads (``.grad`` at
    ZeRO 0, the rank's slices under ZeRO)."""
    step = optimizer.step

    def watched():
        if zero == 0:
            arrays = list({id(p.grad): p.grad for p in model.parameters() if p.grad is not None}.values())
        else:
            arrays = [a for a in optimizer.gradients.grad_shards if a is not None]
        seen["final"] = sum(a.nbytes for a in arrays)
        seen["final dtypes"] = {str(a.dtype) for a in arrays}
        return step()
    optimizer.step = watched


def mixed_optimizer(model, mesh, zero, reduce_dtype):
    """AdamW with fp32 masters: ``MasterWeights`` and an ``AllReduceGradients`` of 2 KiB buckets at ZeRO 0,
    else ZeRO's own slices (``master_dtype``); the gradients reduced in ``reduce_dtype`` (None: the model's)."""
    from minitp.nn.master_weights import MasterWeights
    from minitp.parallel.data.sync import AllReduceGradients
    from minitp.parallel.data.zero import ZeroOptimizer
    from minitp.parallel.data.zero3 import FullyShardedOptimizer

    optimizer = AdamW(model.named_parameters())
    if zero == 0:
        return (MasterWeights(optimizer, numpy.float32),
                AllReduceGradients(model, mesh, 2048, reduce_dtype=reduce_dtype))
    if zero == 3:
        return FullyShardedOptimizer(optimizer, model, mesh, master_dtype=numpy.float32,
                                     reduce_dtype=reduce_dtype), None
    return ZeroOptimizer(optimizer, mesh, 2048, stage=zero, master_dtype=numpy.float32,
                         reduce_dtype=reduce_dtype), None


def mixed_states(model, optimizer, zero):
    """(master weights, the moments) in bytes: MasterWeights' or ZeRO's "master" buffers, and the rest."""
    state = optimizer.state_bytes()
    masters = (sum(a.nbytes for a in optimizer.master.values()) if zero == 0 else
               sum(entry["master"].nbytes for entry in optimizer.state.values() if "master" in entry))
    return masters, state - masters


def saved_by_the_loss(model, mesh, ids, targets):
    """The bytes ``track_saved`` sees around one forward of the loss on this rank's share of the batch."""
    from minitp.parallel.data.data_parallel import split_batch

    with track_saved() as saved:
        model.loss(split_batch(ids, mesh), split_batch(targets, mesh))
    return saved.total


def measured_step(model, optimizer, ids, targets, mesh, gradients=None, watch=None, **train):
    """One ``train_step`` (max_norm 1), measured: ``seen["gradients"]``, the gradient bytes alive at the end of
    backward; with ``watch`` (the ZeRO stage) ``seen["final"]`` and ``seen["final dtypes"]``, the gradients
    the update reads; ``collectives``, the step's log by (group, op); ``norm``, the step's gradient norm."""
    from minitp.training import train_step

    seen = {}
    measure_gradients_at_finish(model, gradients or optimizer, seen)
    if watch is not None:
        watch_the_update(model, optimizer, watch, seen)
    with comm.log_collectives() as log:
        _, norm = train_step(model, optimizer, ids, targets, mesh, max_norm=1.0, gradients=gradients, **train)
    return SimpleNamespace(optimizer=optimizer, seen=seen, collectives=logged(log), norm=norm)


def measured_mixed_step(model, mesh, ids, targets, precision, zero, reduce, **train):
    """``measured_step`` in mixed precision as train_gpt.py runs it: fp32 masters (``mixed_optimizer``), the
    gradients reduced in ``reduce`` ("model" or "fp32"), fp16 with its loss scaler; also ``masters`` and
    ``moments``, the optimizer's bytes after the step."""
    from minitp.nn.loss_scale import DynamicLossScaler

    optimizer, gradients = mixed_optimizer(model, mesh, zero, numpy.float32 if reduce == "fp32" else None)
    scaler = DynamicLossScaler(2.0 ** 10) if precision == "fp16" else None
    step = measured_step(model, optimizer, ids, targets, mesh, gradients, watch=zero, scaler=scaler, **train)
    step.masters, step.moments = mixed_states(model, optimizer, zero)
    return step


def mixed_figures(stage, step, zero, rank, dtype):
    """(planned, measured) in mixed precision: the gradients at the end of backward, the fp32 masters and
    moments (per dp rank under ZeRO: the padding rule), and the gradients the update reads -- fp32 when
    planned (their bytes), else in the model's ``dtype``."""
    memory = {key: figure.value for key, figure in stage.memory.items()}
    final = stage.temporaries.get("fp32 gradients")
    seen = step.seen
    return {"gradients": (memory["gradients"], seen["gradients"]),
            "master weights": (stage.master_weights_of(rank) if zero else memory["master weights"], step.masters),
            "optimizer state": (stage.optimizer_state_of(rank) if zero else memory["optimizer state"],
                                step.moments),
            "final gradients": ((final.value, {"float32"}) if final else (seen["final"], {dtype}),
                                (seen["final"], seen["final dtypes"]))}
