"""What does a schedule look like? Its timeline drawn as a row of boxes per stage, time to the right --
the figure of the GPipe and Megatron papers: forwards blue, backwards green (a darker shade per model
chunk), the bubble the white space between them. Needs matplotlib (the ``bench`` extra); without it
``draw`` says so and draws nothing.
"""
FORWARD = ("#9ecae1", "#4292c6", "#08519c", "#08306b")  # one shade per chunk: a, b, c, d
BACKWARD = ("#a1d99b", "#41ab5d", "#006d2c", "#00441b")


def draw(timelines, path, unit="time"):
    """Draw ``timelines`` ({title: ``clock.Timeline``}) one above the other, on one time axis labelled
    ``unit``, into the image ``path``; returns ``path``, or None (with the reason printed) when
    matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib, or the [bench] extra)")
        return None
    matplotlib.use("Agg")  # a file, not a window
    import matplotlib.pyplot as plt

    stages = sum(len(timeline.rows) for timeline in timelines.values())
    longest = float(max(timeline.makespan for timeline in timelines.values()))  # one time scale for all
    figure, axes = plt.subplots(len(timelines), 1, squeeze=False,
                                figsize=(11, 0.9 * len(timelines) + 0.38 * stages))
    for axis, (title, timeline) in zip(axes[:, 0], timelines.items()):
        origin = min(start for row in timeline.rows for start, _, _ in row)
        for rank, row in enumerate(timeline.rows):
            for start, end, action in row:
                start, end = float(start - origin), float(end - origin)  # Fractions or seconds
                shades = FORWARD if action.kind == "F" else BACKWARD
                axis.broken_barh([(start, end - start)], (rank - 0.4, 0.8), edgecolor="white",
                                 facecolors=shades[action.chunk % len(shades)])
                axis.text((start + end) / 2, rank, action.label(timeline.chunks), ha="center",
                          va="center", fontsize=6, color="white" if action.chunk else "black")
        axis.set_yticks(range(len(timeline.rows)), [f"stage {rank}" for rank in range(len(timeline.rows))])
        axis.set_ylim(len(timeline.rows) - 0.5, -0.5)
        axis.set_xlim(0, longest)
        idle = sum(float(timeline.idle_fraction(rank)) for rank in range(len(timeline.rows))) / len(timeline.rows)
        axis.set_title(f"{title}: idle {idle:.0%} of the step (mean over the stages)", fontsize=9, loc="left")
        axis.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel(unit, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
