"""The memory of one rank per pipeline stage, as stacked bars (matplotlib, imported only when drawing)."""

GiB = 2 ** 30


def draw(result, path, budget=None):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    stages = result.stages
    names = [name for name in ("parameters", "gradients", "master weights", "optimizer state", "activations")
             if name in stages[0].memory]
    figure, axis = pyplot.subplots(figsize=(1.6 * len(stages) + 4, 4.5))
    bottoms = [0.0] * len(stages)
    x = list(range(len(stages)))
    for index, name in enumerate(names + ["largest temporary"]):
        values = [(s.memory[name].value if name in s.memory else max([f.value for f in s.temporaries.values()] or [0]))
                  / GiB for s in stages]
        axis.bar(x, values, bottom=bottoms, label=name, color=f"C{index}")
        bottoms = [b + v for b, v in zip(bottoms, values)]
    if budget:
        axis.axhline(budget / GiB, color="k", ls="--", lw=1, label=f"GPU memory {budget / GiB:g} GiB")
    axis.set_xticks(x, [f"stage {s.stage}\n({s.held} held)" for s in stages])
    axis.set_ylabel("GiB per rank")
    mesh, choices = result.mesh, result.choices
    axis.set_title(f"l={result.model.layers} h={result.model.hidden}: dp={mesh.dp} pp={mesh.pp} cp={mesh.cp} "
                   f"tp={mesh.tp}, SP={'on' if choices.sequence_parallel else 'off'}, "
                   f"recompute={choices.recompute or 'none'}, ZeRO-{choices.zero}, {choices.precision}", fontsize=9)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
