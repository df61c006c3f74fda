"""Tensor and sequence parallelism: the papers' communication operators and the sharded layers."""
from minitp.parallel.mappings import (
    copy_to_tensor_parallel_region,
    f,
    f_bar,
    g,
    g_bar,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
