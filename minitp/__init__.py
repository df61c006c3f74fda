"""minitp: Megatron-style tensor and sequence parallelism, built from scratch and proven exact.

Layers, bottom to top (imports point down only):
    allocator   keep freed memory for the next step (glibc), set on import
    backend     numpy or CuPy
    saved_bytes the bytes ops keep for backward (track_saved)
    trace       what each rank did when: spans recorded while a timeline is open
    autograd    Tensor, Function, the graph walk
    functional  every differentiable op
    nn          Module, Parameter, the serial layers, optimizers
    comm        MPI: the process mesh, buffer collectives, the collective log
    report      a program on many ranks talking to a person: print once, rank by rank, one verdict
    trace_report  what a trace says: compute, communication, idle, the share hidden; pictures
    parallel    the paper's operators (f, f-bar, g, g-bar) and the sharded layers
    testing     gradient checks and error measures
    checkpoint  one full npz from any mesh, loaded into any other
"""
from minitp import allocator  # noqa: F401 -- first: the allocator setting applies to every array after it
from minitp.autograd import Function, Tensor, no_grad
from minitp.saved_bytes import track_saved

__version__ = "0.1.0"
__all__ = ["Function", "Tensor", "no_grad", "track_saved"]
