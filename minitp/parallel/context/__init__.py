"""The context-parallel axis: every activation split along the sequence over ``mesh.cp``, attention
crossing the ranks.

    ring      ring attention: K, V travel around the cp ranks, outputs merge by log-sum-exp (contiguous or zigzag)
    ulysses   Ulysses attention: all-to-all from sequence-split to head-split q, k, v and back
    layers    ContextParallelLayers (the tensor-parallel layers, with the sequence split over cp too) and
              context_layers, which picks the layers of a ParallelGPT
"""
