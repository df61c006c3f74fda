"""What a layer is: a ``Module`` that owns ``Parameter``s and sub-modules, found by name.

Assigning a ``Parameter`` or a ``Module`` to an attribute registers it (``self.fc1 = Linear(...)``), so
``named_parameters()`` can walk the model and give every weight a dotted name (``blocks.0.mlp.fc1.weight``)
in a deterministic order: the order the attributes were assigned. Those names are what a checkpoint
stores and what a tensor-parallel layer uses to find the serial weight it cuts its shard from.
"""
import numpy

from minitp import backend
from minitp.autograd import Tensor, _HookHandle


class Parameter(Tensor):
    """A weight: a leaf tensor that requires grad and that the optimizer updates.

    ``is_parameter`` tells the saved-bytes accounting that this array is a weight, not an activation.
    """

    is_parameter = True

    def __init__(self, data, name=None):
        super().__init__(data, requires_grad=True, name=name)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class Module:
    """A layer: ``forward`` does the work, ``__call__`` runs it; parameters and sub-modules register
    themselves when assigned as attributes."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call Module.__init__() before assigning attributes")
        # An attribute changes kind (a Parameter replaced by a Module, or by None): forget the old entry.
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    _forward_pre_hooks = ()  # a module's own lists once a hook is registered (torch's hooks of these names)
    _forward_hooks = ()

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def __call__(self, *args, **kwargs):
        for hook in self._forward_pre_hooks:
            hook(self, args)
        output = self.forward(*args, **kwargs)
        for hook in self._forward_hooks:
            replaced = hook(self, args, output)
            if replaced is not None:
                output = replaced
        return output

    def register_forward_pre_hook(self, hook):
        """Call ``hook(module, args)`` before every forward (ZeRO-3 gathers a unit's parameters there).
        Returns a handle: ``handle.remove()``."""
        if not self._forward_pre_hooks:
            object.__setattr__(self, "_forward_pre_hooks", [])
        self._forward_pre_hooks.append(hook)
        return _HookHandle(self._forward_pre_hooks, hook)

    def register_forward_hook(self, hook):
        """Call ``hook(module, args, output)`` after every forward; a result that is not None replaces the
        output (ZeRO-3 frees the unit there and marks the output to gather it again for backward)."""
        if not self._forward_hooks:
            object.__setattr__(self, "_forward_hooks", [])
        self._forward_hooks.append(hook)
        return _HookHandle(self._forward_hooks, hook)

    # -- walking the tree ------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        """(dotted name, module) for this module and every module below it, parents first."""
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [module for _, module in self.named_modules()]

    def named_parameters(self):
        """(dotted name, Parameter) pairs: each module's own parameters, then its sub-modules', in the
        order they were assigned. A parameter shared by two modules (tied weights) appears once, under
        its first name."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, parameter in module._parameters.items():
                if id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                yield (f"{prefix}.{name}" if prefix else name), parameter

    def parameters(self):
        return [parameter for _, parameter in self.named_parameters()]

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self):
        """{dotted name: a copy of the parameter's array} (on the parameter's device).

        Copies, so that later optimizer steps (which update parameters in place) do not change a
        checkpoint already taken.
        """
        return {name: parameter.data.copy() for name, parameter in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy ``state`` (name -> array, numpy or CuPy) into the parameters, in place.

        Every name must match and every shape must agree; otherwise a ValueError names the culprits
        and nothing is loaded.
        """
        parameters = dict(self.named_parameters())
        missing = [name for name in parameters if name not in state]
        unexpected = [name for name in state if name not in parameters]
        if missing or unexpected:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing parameters {missing}, "
                             f"unexpected parameters {unexpected}")
        for name, parameter in parameters.items():
            shape = tuple(state[name].shape)
            if shape != parameter.shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: parameter {name!r} has shape "
                                 f"{parameter.shape}, the state holds shape {shape}")
        for name, parameter in parameters.items():
            xp = backend.array_module(parameter.data)
            value = state[name]
            if xp is numpy:
                value = backend.to_host(value)
            parameter.data[...] = xp.asarray(value, dtype=parameter.dtype)

    # -- modes and gradients ---------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (dropout on) for this module and every module below it; returns self."""
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        """Evaluation mode: dropout becomes the identity."""
        return self.train(False)

    def zero_grad(self):
        """Forget the gradients (``.grad = None``): the next backward starts from nothing."""
        for parameter in self.parameters():
            parameter.grad = None

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return "\n".join(lines) + ("\n)" if len(lines) > 1 else ")")


class ModuleList(Module):
    """A list of modules registered as ``0``, ``1``, ... (so their parameters are ``blocks.0.*``...).

    ``start``: the name of the first, for a part of a longer list (a pipeline stage holding blocks 4..7
    names them ``blocks.4`` ... ``blocks.7``, as the whole model does)."""

    def __init__(self, modules=(), start=0):
        super().__init__()
        object.__setattr__(self, "start", start)
        for module in modules:
            self.append(module)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        setattr(self, str(self.start + len(self._modules)), module)
        return self

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())
