"""What the stand-in pretends about the machine, and what it saw -- the only state it keeps.

Settings, read once from the environment (a launched tutorial inherits them):

- ``CUPY_STANDIN_DEVICES``: how many GPUs the machine has (default 2; 0 makes every CUDA call fail as
  on a machine without a driver), so that rank r is seen to take GPU r % count;
- ``CUPY_STANDIN_CUDA_AWARE_MPI=1``: the MPI library can read device memory. Otherwise a device buffer
  handed to MPI is refused, as a real MPI without CUDA support would crash on it.
"""
import os

device_count = int(os.environ.get("CUPY_STANDIN_DEVICES", "2"))
cuda_aware_mpi = os.environ.get("CUPY_STANDIN_CUDA_AWARE_MPI", "0") == "1"

current_device = 0
"""The device ``cupy.cuda.Device(i).use()`` selected last."""

queued = False
"""Whether work was queued since the last synchronisation. CuPy returns from an op as soon as its kernel
is queued on the stream; MPI reading the memory before the kernel has run reads stale values. The
stand-in runs every op at once, so it cannot go wrong that way: it keeps this flag instead, and refuses
to hand a buffer to another library (``__dlpack__``) while the flag is up."""

buffers_to_mpi = 0
"""How many device buffers were handed over through ``__dlpack__`` (to a CUDA-aware MPI)."""

copies_to_host = 0
"""How many arrays were copied device -> host (``get``, ``asnumpy``, ``float``, ``item``...)."""
