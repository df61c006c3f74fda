"""Does a checkpoint file fit this model? Every way it does not, one line each, naming the entry: a missing
or unexpected parameter, a wrong shape or dtype, an incomplete optimizer state, another configuration or
metadata. ``load`` refuses the file, on every rank, with the first ``PARAMETER_ERRORS_SHOWN`` of them."""
import json

PARAMETER_ERRORS_SHOWN = 8  # a checkpoint of another model fails on every name: show the first few


def misfits(arrays, expected, with_optimizer):
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


def _shorten(text, width=60):
    return repr(text) if len(text) <= width else repr(text[:width]) + f"... ({len(text)} characters)"
