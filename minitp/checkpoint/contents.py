"""What must a checkpoint of this model hold? The serial shapes of its parameters, the optimizer's state,
the dropouts' counters, the configuration -- and, under pipeline parallelism, every stage's part merged on
the first stage."""
from mpi4py import MPI

from minitp.nn.layers import Dropout
from minitp.parallel.tensor.shard import split_axis


def world_comm(mesh):
    """The communicator of every rank (rank 0 writes and reads the file)."""
    return mesh.world.comm if mesh is not None else MPI.COMM_WORLD


def over_stages(mine, mesh, merge):
    """Every pipeline stage's ``mine`` merged on the first stage (``merge(list in stage order)``); None on
    the others. Without stages, ``mine`` itself."""
    if mesh is None or mesh.pp_size == 1:
        return mine
    stages = mesh.pp.comm.gather(mine, root=0)
    return merge(stages) if stages is not None else None


def merge_arrays(stages):
    """The stages' {key: array} as one dict (a tied table or a shared counter is held by two stages)."""
    merged = {}
    for arrays in stages:  # stage order: the first stage's tied table and shared counters win
        for key, array in arrays.items():
            merged.setdefault(key, array)
    return merged


def merge_expected(stages):
    """The stages' ``expected_contents`` as one: every stage's parameters and dropouts."""
    return {"shapes": {name: shape for stage in stages for name, shape in stage["shapes"].items()},
            "optimized": set().union(*(stage["optimized"] for stage in stages)),
            "dropouts": list(dict.fromkeys(name for stage in stages for name in stage["dropouts"])),
            "config": stages[0]["config"], "buffers": stages[0]["buffers"]}


def expected_contents(model, optimizer, mesh):
    """What the checkpoint must hold for this model: {parameter name: serial shape}, the optimizer's
    parameter names, the dropouts' names."""
    tp = mesh.tp_size if mesh is not None else 1
    shapes = {}
    for name, p in model.named_parameters():
        shape, axis = list(p.shape), split_axis(p)
        if axis is not None:
            shape[axis] *= tp  # the serial shape: t blocks along the split axis
        shapes[name] = tuple(shape)
    optimized = [name for _, _, name in optimizer_parameters(model, optimizer)] if optimizer is not None else []
    return {"shapes": shapes, "optimized": set(optimized), "dropouts": [name for name, _ in dropouts(model)],
            "config": model_config(model), "buffers": tuple(getattr(optimizer, "state_buffers", ()))}


def optimizer_parameters(model, optimizer):
    """(optimizer key, parameter, model name) for each parameter the optimizer updates. The optimizer may
    key its state by name or by index: the model's name is what the checkpoint uses either way."""
    names = {id(p): name for name, p in model.named_parameters()}
    found = []
    for key, parameter in zip(optimizer.keys, optimizer.params):
        if id(parameter) not in names:
            raise ValueError(f"the optimizer's parameter {key!r} is not a parameter of the model")
        found.append((key, parameter, names[id(parameter)]))
    return found


def model_config(model):
    """The model's configuration as a dict (``GPTConfig.to_dict``), or None for a model without one. The
    dtype is left out: a float32 checkpoint may be loaded into a float64 model, and back."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    # the dtype and the recomputation say how the model runs, not which weights it has
    return {key: value for key, value in config.to_dict().items() if key not in ("dtype", "recompute")}


def dropouts(model):
    """(name, module) of each dropout: its call counter is saved, so its masks go on where they stopped."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Dropout)]
