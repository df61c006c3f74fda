"""Tensor and sequence parallelism: the papers' communication operators and the sharded layers.

    mappings     f, f̄ (Megatron's g), g, ḡ and the scatter/gather region operators, as autograd Functions
    layers       ColumnParallelLinear, RowParallelLinear
    builders     TensorParallelLayers: the layers a serial module is built from, tensor-parallel
    mlp          ParallelMLP (Megatron: column then row), SyncPointMLP (the notebook's row-split first GEMM)
    attention    ParallelAttention (whole heads per rank)
    sequence     SequenceParallelLayerNorm, SequenceParallelDropout
    transformer  ParallelTransformerBlock (sequence_parallel=False|True)
    embedding    VocabParallelEmbedding (vocabulary rows split)
    cross_entropy vocab_parallel_cross_entropy (three all-reduces of s×b numbers, never the logits)
    shard        load_serial_state, gather_serial_state, gather_serial_grads
    ring_attention  ring attention over the cp ranks: K, V travel, outputs merge by log-sum-exp (contiguous or zigzag)
    ulysses      Ulysses attention: all-to-all from sequence-split to head-split q, k, v and back
    context      ContextParallelLayers: every activation split along the sequence over cp
    gpt          ParallelGPT (vocab-parallel embedding and loss, TP(+SP) blocks, optionally CP)
    async_linear   Megatron's asynchronous linear backward (dX reduced during dA's GEMM)
    buckets        GradientBuckets: flat buckets all-reduced or reduce-scattered, started during backward
    zero           ZeroOptimizer: ZeRO-1 over the dp axis
    data_parallel  the dp axis of the mesh: batch split, one bucketed gradient all-reduce, global-norm clipping
"""
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
from minitp.parallel.layers import ColumnParallelLinear, RowParallelLinear
from minitp.parallel.builders import TensorParallelLayers
from minitp.parallel.mlp import ParallelMLP, SyncPointMLP
from minitp.parallel.attention import ParallelAttention
from minitp.parallel.sequence import SequenceParallelDropout, SequenceParallelLayerNorm
from minitp.parallel.transformer import ParallelTransformerBlock
from minitp.parallel.shard import gather_serial_grads, gather_serial_state, load_serial_state
from minitp.parallel.embedding import VocabParallelEmbedding
from minitp.parallel.cross_entropy import vocab_parallel_cross_entropy
from minitp.parallel.ring_attention import attended_pairs, ring_attention, ring_schedule
from minitp.parallel.ulysses import ulysses_attention
from minitp.parallel.context import ContextParallelLayers
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.data_parallel import (
    all_reduce_gradients,
    average_over_data_parallel,
    clip_grad_norm,
    grad_norm,
    split_batch,
    train_step,
)
