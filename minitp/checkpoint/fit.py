"""Does a checkpoint file fit this model? Every way it does not, one line each, naming the entry: a missing
or unexpected parameter, a wrong shape or dtype, a value ``save`` cannot have written (a NaN weight, a
negative step or counter), an incomplete optimizer state, another configuration or metadata. ``load``
refuses the file, on every rank, with the first ``PARAMETER_ERRORS_SHOWN`` of them.

Every entry is checked against what ``save`` writes, because whatever gets past here is trained on
without complaint: a negative step ends in a numpy traceback steps later, a NaN weight makes every loss
NaN, a parameter whose optimizer state was dropped restarts its moments at zero and the losses drift.

    parameters                  floating point, the serial shape, finite
    optimizer/<buffer>/<name>   a buffer the optimizer keeps, like the parameter; exp_avg_sq >= 0 too
    optimizer/step/<name>       one integer, 1 <= it <= optimizer/step (the parameter's update count)
    optimizer/step              one integer >= 0
    dropout/<name>              one integer >= 0 (a call counter), for a dropout of the model
    checkpoint/step             one integer >= 0
    checkpoint/config           one string: the JSON object of the model's configuration
    metadata/<key>              one string
    scaler/scale                one floating-point number, finite and > 0       (with ``load(scaler=)``:
    scaler/clean_steps          one integer, 0 <= it < the scaler's growth_interval   all three needed;
    scaler/skipped              one integer >= 0                                      without: ignored)

Buffers are floating point of any width: a float32 checkpoint loads into a float64 run and back, and
each is cast to the dtype its optimizer keeps it in at load (``Optimizer.state_dtype``: ``MasterWeights``
keeps its masters and moments in the master dtype, not the model's).

"One integer": a 0-d array of an integer dtype (``save`` writes int64) -- a float 3.0 or a bool is not
one, nor a value beyond int64.
"""
import json

import numpy

PARAMETER_ERRORS_SHOWN = 8  # a checkpoint of another model fails on every name: show the first few
INT64_MAX = int(numpy.iinfo(numpy.int64).max)  # save writes every integer as int64
# buffers that are means of squares: a negative one is no state AdamW can reach, and its sqrt is NaN
NONNEGATIVE_BUFFERS = ("exp_avg_sq",)
SCALER_ENTRIES = ("scaler/scale", "scaler/clean_steps", "scaler/skipped")  # a DynamicLossScaler's state


def misfits(arrays, expected, with_optimizer):
    """Every way ``arrays`` does not fit the model, one line each, naming the entry."""
    shapes, optimized, dropout_names = expected["shapes"], expected["optimized"], expected["dropouts"]
    problems = []
    # an npz member that is not a .npy file comes back from numpy.load as bytes, not an array
    for key, value in arrays.items():
        if not isinstance(value, numpy.ndarray):
            problems.append(f"entry {key!r} is not a numpy array (a {type(value).__name__}): "
                            "not written by minitp.checkpoint.save")
    arrays = {key: value for key, value in arrays.items() if isinstance(value, numpy.ndarray)}

    def check_floats(key, shape, what, nonnegative=False):
        """A floating-point array of ``shape`` with finite values (and >= 0 for a mean of squares)."""
        array = arrays[key]
        if array.dtype.kind != "f":
            problems.append(f"{what} {key!r} holds {array.dtype} values, not floating-point numbers")
        elif array.shape != shape:
            problems.append(f"{what} {key!r} has shape {array.shape} in the checkpoint, {shape} in the model")
        elif not numpy.isfinite(array).all():
            bad = int(array.size - numpy.isfinite(array).sum())
            problems.append(f"{what} {key!r} holds {bad} NaN or infinite value(s): the file is corrupt, or the "
                            "run that saved it had diverged")
        elif nonnegative and (array < 0).any():
            problems.append(f"{what} {key!r} holds negative values: a mean of squares cannot be negative")

    def integer(key, low, what):
        """The 0-d integer at ``key`` if it is one from ``low`` to int64's largest, else None (a problem said)."""
        array = arrays[key]
        if array.shape != () or array.dtype.kind not in "iu":
            problems.append(f"{key!r} must be one integer, the checkpoint holds {array.dtype} of shape {array.shape}")
            return None
        value = int(array)
        if value < low:
            problems.append(f"{key!r} is {value}: {what} is {low} or more")
            return None
        if value > INT64_MAX:  # a uint64 beyond what save's int64 holds
            problems.append(f"{key!r} is {value}: beyond the int64 that {what} is saved as")
            return None
        return value

    def is_string(key):
        array = arrays[key]
        if array.shape != () or array.dtype.kind != "U":
            problems.append(f"{key!r} must be one string, the checkpoint holds {array.dtype} of shape {array.shape}")
            return False
        return True

    optimizer_step = None
    if "optimizer/step" in arrays:  # first: it bounds every parameter's step
        optimizer_step = integer("optimizer/step", 0, "the optimizer's step count")
    metadata_ok = {}
    for key in arrays:
        if key in shapes:
            check_floats(key, shapes[key], "parameter")
        elif key == "checkpoint/step":
            integer(key, 0, "the training step")
        elif key in ("optimizer/step", "checkpoint/config"):
            pass  # checked above, and by _config_problems
        elif key.startswith("metadata/"):
            metadata_ok[key] = is_string(key)
        elif key in SCALER_ENTRIES:
            if expected.get("scaler") is not None:  # else not loaded: nothing to check
                _scaler_entry(key, arrays[key], expected["scaler"], integer, problems)
        elif key.startswith("dropout/"):
            if key[len("dropout/"):] not in dropout_names:
                problems.append(f"unexpected entry {key!r}: the model has no dropout {key[len('dropout/'):]!r}")
            else:
                integer(key, 0, "a dropout's call counter")
        elif len(key.split("/")) == 3 and key.startswith("optimizer/"):
            _, buffer, name = key.split("/")
            if name not in shapes:
                problems.append(f"unexpected entry {key!r}: the model has no parameter {name!r}")
            elif with_optimizer and name not in optimized:
                problems.append(f"unexpected entry {key!r}: the optimizer does not update parameter {name!r}")
            elif buffer == "step":
                # a parameter's state is made at its first update (step 1), and it is updated at most
                # once per optimizer step; Adam's bias correction divides by 1 - beta**step: 0 at step 0
                bound = INT64_MAX if optimizer_step is None else optimizer_step
                value = integer(key, 1, "a parameter's update count")
                if value is not None and value > bound:
                    problems.append(f"{key!r} is {value}, beyond 'optimizer/step' {bound}: a parameter is "
                                    "updated at most once per optimizer step")
            elif with_optimizer and buffer not in expected["buffers"]:
                kept = ", ".join(repr(b) for b in expected["buffers"]) or "none"
                problems.append(f"unexpected entry {key!r}: the optimizer keeps no buffer {buffer!r} "
                                f"(it keeps {kept})")
            else:
                check_floats(key, shapes[name], f"optimizer state {buffer} of", buffer in NONNEGATIVE_BUFFERS)
        else:
            problems.append(f"unexpected entry {key!r}: not a parameter of this model")

    for name in shapes:
        if name not in arrays:
            problems.append(f"parameter {name!r} is missing")
    for name in dropout_names:
        if f"dropout/{name}" not in arrays:
            problems.append(f"the counter of dropout {name!r} (key 'dropout/{name}') is missing")
    if "checkpoint/step" not in arrays:
        problems.append("'checkpoint/step' is missing")
    problems += _config_problems(arrays, expected["config"])
    for key, value in expected.get("metadata", {}).items():
        stored = f"metadata/{key}"
        if stored not in arrays:
            problems.append(f"{stored!r} is missing: the checkpoint does not say which {key} it was saved with")
        elif metadata_ok[stored] and str(arrays[stored]) != value:
            problems.append(f"the checkpoint was saved with another {key}: {_shorten(str(arrays[stored]))} "
                            f"there, {_shorten(value)} here")
    if expected.get("scaler") is not None:
        problems += [f"the loss scaler's state {key!r} is missing (saved without scaler=?)"
                     for key in SCALER_ENTRIES if key not in arrays]
    if with_optimizer:
        if "optimizer/step" not in arrays:
            problems.append("the optimizer's state ('optimizer/step') is missing")
        problems += _optimizer_state_problems(arrays, optimized, expected["buffers"], optimizer_step)
    return problems


def _scaler_entry(key, array, scaler, integer, problems):
    """A loss scaler's entry: the scale one positive finite float, the counters integers >= 0, and
    clean_steps below the scaler's growth_interval (its update grows S when the count reaches it: at or
    beyond, S would never grow again)."""
    if key == "scaler/scale":
        if array.shape != () or array.dtype.kind != "f":
            problems.append(f"{key!r} must be one floating-point number, the checkpoint holds {array.dtype} "
                            f"of shape {array.shape}")
        elif not (numpy.isfinite(array) and array > 0):
            problems.append(f"{key!r} is {float(array)}: a loss scale is positive and finite")
        return
    value = integer(key, 0, "a loss scaler's step count")
    if key == "scaler/clean_steps" and value is not None and value >= scaler["growth_interval"]:
        problems.append(f"{key!r} is {value}, not below this scaler's growth_interval {scaler['growth_interval']}: "
                        "its scale would never grow again")


def _optimizer_state_problems(arrays, optimized, buffers, optimizer_step):
    """Every optimized parameter's state, whole, once the optimizer has stepped; none before.

    ``save`` writes a parameter's state -- its update count and each buffer -- once the optimizer has
    updated it, and these models give every parameter a gradient at every step: a file saved before the
    first step (optimizer/step 0) holds no parameter's state, any later one holds every parameter's. A
    file holding some parameters' state but not another's, or a second moment without its first, is
    damaged: loaded, that parameter would restart from zero moments, and the losses drift from the run
    that saved it (by about 1e-3 within a few steps) with no error.
    """
    if optimizer_step is None:  # missing or not an integer: said already
        return []
    needed = {name: [f"optimizer/step/{name}"] + [f"optimizer/{buffer}/{name}" for buffer in buffers]
              for name in sorted(optimized)}
    holding = [name for name, keys in needed.items() if any(key in arrays for key in keys)]
    problems = []
    for name, keys in needed.items():
        missing = ", ".join(repr(key) for key in keys if key not in arrays)
        if name in holding and missing:
            problems.append(f"the optimizer state of {name!r} is incomplete: {missing} missing")
        elif name not in holding and optimizer_step > 0:
            others = (f"while {len(holding)} other parameter(s) have theirs" if holding else
                      "as is every parameter's")
            problems.append(f"the optimizer state of {name!r} is missing ({missing}), {others}: after "
                            f"'optimizer/step' {optimizer_step} every parameter has its state (load without "
                            "an optimizer to take the weights alone)")
    return problems


def _config_problems(arrays, expected):
    """How the stored configuration differs from the model's, one line per field."""
    if expected is None:
        return []
    if "checkpoint/config" not in arrays:
        return ["'checkpoint/config' (the model's configuration) is missing"]
    config = arrays["checkpoint/config"]
    if config.shape != () or config.dtype.kind != "U":
        return [f"'checkpoint/config' must be one string (JSON), the checkpoint holds {config.dtype} "
                f"of shape {config.shape}"]
    try:
        stored = json.loads(str(config))
    except ValueError:
        stored = None
    if not isinstance(stored, dict):  # valid JSON, but a number or a list, is no configuration either
        return ["'checkpoint/config' is not the JSON of a model configuration"]
    return [f"the checkpoint's model has {key}={stored.get(key)!r}, this model {key}={value!r}"
            for key, value in expected.items() if stored.get(key) != value]


def _shorten(text, width=60):
    return repr(text) if len(text) <= width else repr(text[:width]) + f"... ({len(text)} characters)"
