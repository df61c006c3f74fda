"""``cupy.cuda.runtime`` of the stand-in: as many devices as ``CUPY_STANDIN_DEVICES`` says."""
from cupy import _standin


class CUDARuntimeError(RuntimeError):
    pass


def _check(device=None):
    if _standin.device_count <= 0:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    if device is not None and not 0 <= device < _standin.device_count:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")


def getDeviceCount():
    _check()
    return _standin.device_count


def getDevice():
    _check()
    return _standin.current_device


def deviceSynchronize():
    _check()
    _standin.queued = False
