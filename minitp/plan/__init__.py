"""Plan a training run before running it: memory per rank, bytes per axis, the bubble, the flops.

    from minitp.plan import Model, Mesh, Choices, plan
    result = plan(Model(vocab=50304, seq_len=4096, hidden=8192, heads=64, layers=80),
                  Mesh(dp=2, pp=4, tp=8), Choices(micro_batch=1, global_batch=16, sequence_parallel=True,
                                                  recompute="selective", zero=1, precision="bf16"))
    result.stages[0].memory["activations"].value       # bytes, with .formula and .source

or from the shell: ``python -m minitp.plan --hidden 8192 --layers 80 --heads 64 --seq 4096 --tp 8 --pp 4 ...``.

Pure Python: nothing here imports MPI or builds a model (``Model.of(config)`` reads a ``GPTConfig``'s fields).
Each figure names its formula and its paper; where minitp's code departs from the paper (LayerNorm's 1/std,
ZeRO's padded buckets and units, ZeRO-3's placeholder, the tied table's view, the vocabulary padded by
``train_gpt.py``) the figure is what the code does, and the module that computes it says how it departs.
What minitp runs today is exact to the byte at small scale (``tests/test_plan.py`` measures it: ZeRO 0-3,
mixed precision -- bf16 and fp16 with fp32 masters at ZeRO 0-3, the gradients reduced in the model's dtype
or in fp32, and through pipeline stages --, context parallelism's ring, zigzag and Ulysses, alone, with
ZeRO 1-3 over dp × cp and on pipeline stages (``tests/test_plan_context.py``), the experts' states, and
their activations, all-to-alls and tp all-reduces (z-loss, bf16 and fp16 too) given the routing counts a run observed,
``Choices.routing``: ``tests/test_plan_experts.py``); ZeRO-3 with pp > 1 (which minitp refuses) and the
experts' activations and all-to-alls planned ahead (GShard's even spread: they follow the routing counts)
are the papers' formulas, marked "formula only: not yet measured against minitp".

    shapes          Model, Mesh, Choices: what is planned
    parameters      the tensors each rank holds; Narayanan et al.'s parameter count
    activations     Korthikanti et al.'s table 2, and minitp's count to the byte
    states          parameters, gradients, optimizer state, master weights; ZeRO stages, padded buckets
    experts         a mixture's activations and all-to-alls: from a run's routing counts, or evenly spread
    communication   every collective of a step, per axis, in ring bytes
    schedule        microbatches held at the peak, the bubble
    flops           Narayanan et al.'s eq. (3), with and without recomputation
    core            plan(): all of it per pipeline stage
    search          does it fit? the smallest change that makes it fit
    report          the table the command prints; picture: the stacked bars
"""
from minitp.plan.core import Figure, Plan, StagePlan, plan
from minitp.plan.shapes import FORMULA_ONLY, Choices, Mesh, Model

__all__ = ["Choices", "FORMULA_ONLY", "Figure", "Mesh", "Model", "Plan", "StagePlan", "plan"]
