"""Every parallelism but the pipeline's, one sub-package per axis of the (dp, pp, cp, tp) mesh, and the GPT
that chooses among them (the pipeline is ``minitp.pipeline``):

    tensor/    the tp axis: f, f̄, g, ḡ; column/row-parallel, vocab-parallel and sequence-parallel layers;
               the parallel MLP, attention and block; cutting serial weights into shards and back
    context/   the cp axis: ring (contiguous, zigzag) and Ulysses attention, the context-parallel layers
    data/      the dp axis (× cp): the batch split, gradient buckets, ZeRO-1/2/3, global-norm clipping
    gpt        ParallelGPT: the serial GPT built from the layers of the axes its mesh has

Everything a user needs is importable from here: ``from minitp.parallel import ParallelGPT, f, g``.
"""
from minitp.parallel.tensor import mappings
from minitp.parallel.tensor.mappings import (
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
from minitp.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
from minitp.parallel.tensor.builders import TensorParallelLayers
from minitp.parallel.tensor.mlp import ParallelMLP, SyncPointMLP
from minitp.parallel.tensor.attention import ParallelAttention
from minitp.parallel.tensor.sequence import SequenceParallelDropout, SequenceParallelLayerNorm
from minitp.parallel.tensor.transformer import ParallelTransformerBlock
from minitp.parallel.tensor.shard import gather_serial_grads, gather_serial_state, load_serial_state
from minitp.parallel.tensor.embedding import VocabParallelEmbedding
from minitp.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from minitp.parallel.context.ring import attended_pairs, ring_attention, ring_schedule
from minitp.parallel.context.ulysses import ulysses_attention
from minitp.parallel.context.layers import ContextParallelLayers
from minitp.parallel.gpt import ParallelGPT
from minitp.parallel.data.data_parallel import (
    average_over_data_parallel,
    clip_grad_norm,
    grad_norm,
    split_batch,
)
from minitp.parallel.data.buckets import GradientBuckets
from minitp.parallel.data.sync import AllReduceGradients, all_reduce_gradients
from minitp.parallel.data.zero import ZeroOptimizer
from minitp.parallel.data.zero3 import FullyShardedOptimizer
