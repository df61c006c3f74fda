"""Pipeline parallelism: the model's layers cut into stages on the mesh's pp axis, microbatches flowing
through them by a schedule (Huang et al. 2019, GPipe; Narayanan et al. 2021, PipeDream-flush and the
interleaved schedule).

    schedules   which F and B each stage runs, in what order: AFAB, 1F1B, interleaved 1F1B
    clock       the plans replayed on a logical clock: deadlock-free, and the bubble they leave
    stages      which layers each stage holds: PipelineGPT, the tied embedding's group
    engine      how a stage runs its plan: receive, compute, send, free; the activations it holds
    training    a step's forward_backward through the stages (the rest of the step: minitp.training)
"""
from minitp.pipeline.schedules import SCHEDULES, Action, check, describe, expected_in_flight, peak_in_flight, plan
from minitp.pipeline.clock import Timeline, bubble_formula, replay
from minitp.pipeline.stages import PipelineGPT, chunk_blocks
from minitp.pipeline.engine import StageRun, activation_shape
from minitp.pipeline.training import check_step, forward_backward
