"""The tensor-parallel axis (Megatron; Korthikanti's sequence parallelism): within a layer, the weights
split over ``mesh.tp`` and the collectives that make the split exact.

    mappings       f, f̄ (Megatron's g), g, ḡ and the scatter/gather region operators, as autograd Functions
    layers         ColumnParallelLinear, RowParallelLinear
    async_linear   Megatron's asynchronous linear backward (dX reduced during dA's GEMM)
    builders       TensorParallelLayers: the layers a serial module is built from, tensor-parallel
    mlp            ParallelMLP (Megatron: column then row), SyncPointMLP (the notebook's row-split first GEMM)
    attention      ParallelAttention (whole heads per rank)
    sequence       SequenceParallelLayerNorm, SequenceParallelDropout
    transformer    ParallelTransformerBlock (sequence_parallel=False|True)
    embedding      VocabParallelEmbedding (vocabulary rows split)
    cross_entropy  vocab_parallel_cross_entropy (three all-reduces of s×b numbers, never the logits)
    shard          load_serial_state, gather_serial_state, gather_serial_grads
"""
