"""The data-parallel axis: replicas of the (sharded) model over ``mesh.dp`` (× ``mesh.cp``: the ranks a
parameter is replicated over), each on its slice of the batch, their gradients averaged.

    data_parallel  the batch split, the replica group, one bucketed gradient all-reduce, global-norm clipping
    buckets        GradientBuckets: flat buckets all-reduced or reduce-scattered, started during backward
    zero           ZeroOptimizer: ZeRO-1, the optimizer state sharded over the replicas
"""
