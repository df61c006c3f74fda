"""The table ``python -m minitp.plan`` prints: per pipeline stage what one rank holds and sends, then the verdict."""
from minitp.plan.shapes import FORMULA_ONLY

GiB = 2 ** 30


def gib(value):
    return f"{value / GiB:,.2f}"


def _order(stage):
    names = ["parameters", "gradients", "master weights", "optimizer state", "activations"]
    return [name for name in names if name in stage.memory]


def table(result):
    """The plan as text: a column per pipeline stage (one rank of it), GiB and GB/step."""
    model, mesh, choices = result.model, result.mesh, result.choices
    lines = [f"model: l={model.layers} h={model.hidden} a={model.heads} s={choices.seq or model.seq_len} "
             f"V={model.vocab} f={model.ffn_hidden}{' tied' if model.tie_embeddings else ''}"
             f"{f' experts={model.experts} top-{model.top_k}' if model.experts else ''}; "
             f"mesh dp={mesh.dp} pp={mesh.pp} cp={mesh.cp} tp={mesh.tp}{f' ep={mesh.ep}' if mesh.ep > 1 else ''}"
             f"{f' v={mesh.virtual_stages}' if mesh.virtual_stages > 1 else ''} ({mesh.world} GPUs); "
             f"b={choices.micro_batch}, m={result.microbatches} microbatches, B={result.microbatches * choices.micro_batch * mesh.dp}; "
             f"SP={'on' if choices.sequence_parallel else 'off'}, recompute={choices.recompute or 'none'}, "
             f"ZeRO-{choices.zero}, {choices.precision}, {choices.schedule}"
             + (f", cp {choices.cp_kind}" if mesh.cp > 1 else ""), ""]
    stages = result.stages
    header = ["per rank (GiB)"] + [f"stage {s.stage}" for s in stages]
    rows = [["parameters (count)"] + [f"{s.parameters / 1e9:.3f} B" if s.parameters >= 1e8 else f"{s.parameters:,}"
                                      for s in stages]]
    for name in _order(stages[0]):
        label = name + (f" ({stages[0].held}..{stages[-1].held} held)" if name == "activations" and len(stages) > 1
                        else f" ({stages[0].held} held)" if name == "activations" else "")
        rows.append([label] + [gib(s.memory[name].value) + ("*" if not s.memory[name].measured else "") for s in stages])
    temporaries = sorted({name for s in stages for name in s.temporaries})
    for name in temporaries:
        rows.append([f"temporary: {name}"] + [gib(s.temporaries[name].value) if name in s.temporaries else "-"
                                              for s in stages])
    rows.append(["total (states + activations + largest temporary)"] + [gib(s.total) for s in stages])
    axes = sorted({axis for s in stages for axis in s.sent()})
    for axis in axes:
        rows.append([f"sent per step on {axis} (GB)"] + [f"{float(s.sent().get(axis, 0)) / 1e9:,.2f}" for s in stages])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    lines.append("")
    lines.append(f"holds: " + " | ".join(f"stage {s.stage}: {s.holds}" for s in stages))
    lines.append(f"bubble: {result.bubble.value:.1%} of the step ({result.bubble.formula}; {result.bubble.source})")
    f = result.flops
    lines.append(f"flops per step: {f['none'].value:.3e} without recomputation, {f['selective'].value:.3e} selective, "
                 f"{f['full'].value:.3e} full ({f['full'].source}); per GPU {f[choices.recompute or 'none'].value / mesh.world:.3e}")
    if any(not fig.measured for s in stages for fig in s.memory.values()) or result.notes:
        lines.append(f"* {FORMULA_ONLY}: " + "; ".join(result.notes or ["see the sources"]))
    return "\n".join(lines)


def sources(result):
    """Each figure of the busiest stage with its formula and paper."""
    stage = result.worst()
    lines = [f"sources (stage {stage.stage}):"]
    for name, figure in list(stage.memory.items()) + list(stage.temporaries.items()):
        lines.append(f"  {name}: {figure.formula} -- {figure.label()}")
    return "\n".join(lines)
