"""One training step for every mesh: a pluggable forward-backward, then one gradient synchronisation.

    step              train_step: forward-backward -> gradients synchronised -> clipped -> optimizer step
    forward_backward  whole_batch (this replica's slice at once) and Pipelined (m microbatches through the
                      pipeline stages by a schedule: AFAB, 1F1B, interleaved)

The synchronisations (plain all-reduce, overlapped buckets, ZeRO-1) are ``minitp.parallel.data.sync``'s
interface; this package sits above ``minitp.parallel`` and ``minitp.pipeline`` and uses both.
"""
from minitp.training.forward_backward import Pipelined, whole_batch
from minitp.training.step import check_train_step, train_step

__all__ = ["Pipelined", "check_train_step", "train_step", "whole_batch"]
