"""``cupy.cuda`` of the stand-in: devices to choose from and a stream to wait for, nothing more."""
from cupy import _standin
from cupy.cuda import runtime


class Device:
    """A GPU by number; ``Device()`` is the current one."""

    def __init__(self, device=None):
        self.id = _standin.current_device if device is None else int(device)

    def use(self):
        runtime._check(self.id)
        _standin.current_device = self.id

    def synchronize(self):
        runtime._check(self.id)
        _standin.queued = False

    def __enter__(self):
        self._previous = _standin.current_device
        self.use()
        return self

    def __exit__(self, *exception):
        _standin.current_device = self._previous

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    """The stream ops are queued on: ``synchronize()`` waits until they have run."""

    def synchronize(self):
        _standin.queued = False


def get_current_stream():
    return Stream()


class MemoryPointer:
    """Where an array's memory starts: ``array.data.ptr``."""

    def __init__(self, ptr):
        self.ptr = ptr
