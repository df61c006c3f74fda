"""``plan(model, mesh, choices)``: every figure for every pipeline stage, each with its formula and source.

One ``StagePlan`` per pipeline stage (the tp, cp and dp ranks of a stage hold the same, but for ZeRO's
padding, which gives the last dp ranks a few elements of optimizer state less: ``optimizer_state_of(dp_rank)``).
"""
from dataclasses import dataclass, field

from minitp.plan import activations, communication, experts, flops, parameters, schedule, states
from minitp.plan.shapes import FORMULA_ONLY, ITEMSIZE, MEASURED_PRECISIONS, check, microbatches


@dataclass
class Figure:
    """A number of bytes (or flops, or a share), its formula and the paper it comes from."""
    value: float
    formula: str
    source: str
    measured: bool = True  # False: formula only, not yet measured against minitp

    def label(self):
        return self.source if self.measured else f"{self.source} -- {FORMULA_ONLY}"


@dataclass
class StagePlan:
    stage: int
    holds: str
    parameters: int
    memory: dict = field(default_factory=dict)       # name -> Figure (bytes)
    temporaries: dict = field(default_factory=dict)  # name -> Figure (bytes): transient, bounded
    messages: list = field(default_factory=list)     # communication.Message
    held: int = 0
    activation_per_chunk: dict = field(default_factory=dict)  # model chunk -> bytes per microbatch (track_saved)
    optimizer_state_of: object = None                # dp rank -> bytes (ZeRO 1-3: the padding)
    master_weights_of: object = None                 # dp rank -> bytes (mixed precision, ZeRO 1-3)

    @property
    def total(self):
        return sum(f.value for f in self.memory.values()) + max([f.value for f in self.temporaries.values()] or [0])

    def sent(self):
        """{axis: bytes this rank sends per step}."""
        return communication.per_axis(self.messages)

    def largest(self):
        name = max(self.memory, key=lambda key: self.memory[key].value)
        return name, self.memory[name]


@dataclass
class Plan:
    model: object
    mesh: object
    choices: object
    microbatches: int
    stages: list
    bubble: Figure
    flops: dict
    notes: list

    @property
    def peak(self):
        return max(stage.total for stage in self.stages)

    def worst(self):
        return max(self.stages, key=lambda stage: stage.total)


def _holds(model, mesh, stage):
    words = []
    for k in range(mesh.virtual_stages):
        c = k * mesh.pp + stage
        blocks = parameters.chunk_layers(model, mesh.pp, mesh.virtual_stages, c)
        part = f"blocks {blocks.start}-{blocks.stop - 1}" if len(blocks) > 1 else f"block {blocks.start}"
        if blocks.start == 0:
            part = "wte, wpe + " + part
        if blocks.stop == model.layers:
            part += " + ln_f, " + ("wte as head" if model.tie_embeddings else "lm_head") + ", loss"
        words.append(part)
    return "; ".join(words)


def plan(model, mesh, choices):
    """Every figure of ``model`` trained on ``mesh`` with ``choices`` (see ``minitp.plan``)."""
    check(model, mesh, choices)
    m = microbatches(mesh, choices)
    p, v, t, d = mesh.pp, mesh.virtual_stages, mesh.tp, mesh.dp * mesh.cp
    measured = choices.precision in MEASURED_PRECISIONS
    e, g = ITEMSIZE[choices.precision], choices.grad_itemsize
    notes = []
    if not measured:
        notes.append(f"precision {choices.precision}")
    if choices.zero == 3 and p > 1:
        notes.append("ZeRO-3 with pp > 1 (minitp refuses it: zero3.check_mesh)")
    if model.experts and not experts.measured(model, mesh, choices):
        notes.append("experts' activations and all-to-alls: they follow the routing counts, unknown before a run "
                     "(GShard's even spread here; give a run's counts as Choices.routing for the exact bytes)")
    stages = []
    for r in range(p):
        tensors = parameters.stage_tensors(model, mesh, r)
        psi = sum(tensor.elements for tensor in tensors)
        sp = StagePlan(r, _holds(model, mesh, r), psi)
        # model states
        model_states = states.model_states(psi, tensors, d, 0, choices)
        # experts: measured without pipelines, in every precision, at ZeRO 0 and, at ep 1, ZeRO 1-3 (ZeRO with
        # ep > 1 is not built: train_gpt.py refuses it) -- tests/test_plan*.py
        formula_only = (not measured or (choices.zero == 3 and p > 1)
                        or (model.experts and (p > 1 or (choices.zero and mesh.ep > 1))))
        for name, (value, source) in model_states.items():
            sp.memory[name] = Figure(value, source, "Rajbhandari et al. 2020 §5.1", not formula_only)
        if choices.zero:  # the same states at another dp rank: ZeRO's padding leaves the last ranks less

            def of_rank(name, psi=psi, tensors=tensors):
                return lambda rank: states.model_states(psi, tensors, d, rank, choices)[name][0]
            sp.optimizer_state_of = of_rank("optimizer state")
            if choices.mixed:
                sp.master_weights_of = of_rank("master weights")
        final = states.final_gradients(psi, tensors, d, choices)
        if final is not None:
            sp.temporaries["fp32 gradients"] = Figure(
                final, ("4Ψ" if not choices.zero else "Σ⌈n/d⌉·4, this rank's slices") + ": the gradients the update "
                "reads, in fp32 (" + ("fp16's loss scaler unscales them into new fp32 arrays"
                                      if choices.precision == "fp16" else "reduced in fp32") + "), alive until the "
                "next step's zero_grad", "minitp.nn.loss_scale.DynamicLossScaler.unscale; parallel.data.buckets "
                "(reduce_dtype)", not formula_only)
        # activations at the schedule's peak
        chunk_of = {k: k * p + r for k in range(v)}
        sp.activation_per_chunk = {c: activations.chunk_bytes(model, mesh, choices, c) for c in chunk_of.values()}
        schedule_name = choices.schedule if p > 1 or m > 1 else "1f1b"
        sp.held = schedule.held(schedule_name, p, m, v, r)
        actions = schedule.order(schedule_name, p, m, v, r)
        peak = schedule.peak_bytes(actions, lambda k: sp.activation_per_chunk[chunk_of[k]])
        cite = ("Korthikanti et al. 2022 table 2 (minitp's count: +2e·sb LayerNorm 1/std, +e for 1/√d per layer; "
                "ends: ids, positions, ln_f, head input, V/t softmax) × the held microbatch-chunks "
                "(Narayanan et al. 2021 §2.2)")
        sp.memory["activations"] = Figure(peak, f"{sp.held} microbatch-chunk(s) held at the peak "
                                                f"({schedule_name}), {', '.join(f'{b:,}' for b in sp.activation_per_chunk.values())} B each",
                                          cite, measured and (not model.experts or experts.measured(model, mesh, choices)))
        # temporaries we can bound
        s = choices.seq or model.seq_len
        if model.layers - 1 in parameters.chunk_layers(model, p, v, chunk_of[v - 1]):
            sp.temporaries["logits"] = Figure(e * (s // mesh.cp) * choices.micro_batch * model.vocab // t,
                                              "s·b·V/t·e, alive until the loss has its softmax",
                                              "Megatron's vocab-parallel loss (Shoeybi et al. 2019 §3)")
        split_experts = model.experts and mesh.ep > 1  # the experts' own buckets, over expert_dp
        sizes = states.buckets([x for x in tensors if not (split_experts and x.expert)], e, choices.bucket_bytes)
        expert_sizes = states.buckets([x for x in tensors if x.expert], e, choices.bucket_bytes) if split_experts else []
        found_units = states.units(tensors)
        gathers = [2] * len(found_units)
        if choices.zero == 3:
            sizes = [n for _, n in found_units]
            whole = [-(-n // d) * d * e for n in sizes]  # a unit gathered: d·⌈n_u/d⌉·e
            tied_here = model.tie_embeddings and found_units[0][0] == "embeddings" and found_units[-1][0] == "head"
            if tied_here:
                # the tied head's wteᵀ: the embeddings unit gathered again in forward and in backward -- but
                # under SP the replicated LayerNorm weights' gradients become final only at the end of the
                # backward (their f all-reduces over tp run last), so no unit is freed inside backward and
                # the embedding's backward finds the table still gathered: 3 gathers, not 4
                gathers[0] = 3 if choices.sequence_parallel else 4
                whole[-1] += whole[0]
            if choices.sequence_parallel:
                sp.temporaries["gathered units"] = Figure(
                    sum(-(-n // d) * d * e for n in sizes), "every unit gathered by the end of backward, "
                    "d·Σ_u⌈n_u/d⌉·e: under SP each unit's gradient is final (and the unit freed) only after the "
                    "LayerNorms' f all-reduces, which run last", "minitp.parallel.data.zero3", False)
            else:
                sp.temporaries["gathered unit"] = Figure(max(whole), "the largest unit gathered whole, d·⌈n_u/d⌉·e "
                                                         "(the tied head: + the embeddings unit)",
                                                         "minitp.parallel.data.zero3 (FSDP, Zhao et al. 2023)", False)
        if d > 1:
            padded = -(-max(sizes) // d) * d if choices.zero else max(sizes)
            sp.temporaries["gradient bucket"] = Figure(padded * g, "the largest bucket's (ZeRO-3: unit's) packed copy, "
                                                       "n·e (ZeRO: padded, d·⌈n/d⌉·e; e = 4 when the gradients "
                                                       "are reduced in fp32)", "minitp.parallel.data.buckets")
        # communication
        layers = [i for c in chunk_of.values() for i in parameters.chunk_layers(model, p, v, c)]
        blocks, first, last = len(layers), 0 in layers, model.layers - 1 in layers
        msgs = communication.tensor_parallel(model, mesh, choices, blocks, first, last, m)
        msgs += communication.context_parallel(model, mesh, choices, blocks, m)
        msgs += experts.messages(model, mesh, choices, layers, m)
        msgs += communication.pipeline(model, mesh, choices, r, m)
        msgs += communication.data_parallel(mesh, choices, sizes, m, gathers, bool(model.experts))
        msgs += [communication.Message("expert_dp", d // mesh.ep, "all_reduce", n, g, 1,
                                       "the experts' gradients, over the dp/ep replicas holding them",
                                       not choices.zero)
                 for n in expert_sizes]  # measured at ZeRO 0 (tests/test_plan_experts.py)
        sp.messages = msgs
        stages.append(sp)
    B = m * choices.micro_batch * mesh.dp
    s = choices.seq or model.seq_len
    counted = flops.model_flops(B, s, model.layers, model.hidden, model.vocab, model.ffn_hidden)
    step_flops = {key: Figure(value, "3× the forward (none), + the attention core (selective), 4× the layers' "
                                     "forward (full)", "Narayanan et al. 2021 eq. (3)") for key, value in counted.items()}
    bubble = Figure(schedule.bubble(choices.schedule, p, m, v) if p > 1 else 0.0,
                    "(p−1)/(m+p−1); interleaved (p−1)/(v·m+p−1)", "Narayanan et al. 2021 §2.2")
    return Plan(model, mesh, choices, m, stages, bubble, step_flops, notes)
