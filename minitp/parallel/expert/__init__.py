"""Expert parallelism: a mixture of experts' E experts spread over the ep ranks, tokens carried to them and
back by all-to-alls (``dispatch.py``), and the layers that place the experts and mark their weights'
reduction group (``layers.py``)."""
from minitp.parallel.expert.dispatch import AllToAllV, dispatch_rows
from minitp.parallel.expert.layers import ExpertParallelLayers

__all__ = ["AllToAllV", "dispatch_rows", "ExpertParallelLayers"]
