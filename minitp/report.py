"""How a program running on many ranks talks to a person.

    from minitp.report import banner, each_rank, ranks, say, verdict
    banner(f"the MLP block split over {ranks(tp_size)}")
    say("Part 1. ...")                       # once, from rank 0
    each_rank(f"A[:, {first}:{last}]")       # one line per rank, in rank order
    verdict(worst <= 1e-12, f"sharded == serial (max error {worst:.1e})", failure=f"max error {worst:.1e}")

Under ``mpirun -n 4`` every rank runs the same script, so a plain ``print`` says everything four times,
and four ranks printing at once interleave their lines in whatever order the terminal receives them.
So the tutorials speak only through rank 0: ``say`` prints what every rank would say alike, once;
``each_rank`` sends each rank's own line to rank 0, which prints them in rank order. The lines travel
with mpi4py's pickling ``gather`` -- fine for a few words of commentary; model data goes through
``minitp.comm``'s buffer collectives.

A check ends the same way on every rank: ``verdict`` agrees on pass or fail with one all-reduce, prints
the verdict once, and on failure makes every rank exit with status 1 together -- a rank that stopped
alone would leave the others waiting in their next collective.

``each_rank`` and ``verdict`` are collective over ``MPI.COMM_WORLD``: call them on every rank, in the
same order. ``say`` and ``banner`` may be called anywhere, and print only on rank 0.
"""
import sys

from mpi4py import MPI

from minitp import backend, comm

INDENT = "     "
"""What ``indent`` puts before each line: tables sit under the "   ..." lines that introduce them."""


def say(text=""):
    """Print ``text`` once, from rank 0: every rank runs the script, and the others would only repeat it."""
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(text, flush=True)


def each_rank(text):
    """Print one line per rank, in rank order, as "   rank r: <that rank's text>" (collective).

    Every rank sends its ``text`` to rank 0, which prints them all; printing from every rank would
    interleave the lines."""
    lines = MPI.COMM_WORLD.gather(text, root=0)
    if lines is not None:  # rank 0
        for rank, line in enumerate(lines):
            print(f"   rank {rank}: {line}", flush=True)


def indent(table):
    """``table`` (lines of text, e.g. a ``CollectiveLog.table()``) with every line indented by ``INDENT``."""
    return "\n".join(INDENT + line for line in table.splitlines())


def ranks(count):
    """"1 rank", "4 ranks"."""
    return f"{count} rank{'s' * (count != 1)}"


def banner(title):
    """Say the run's first line: "minitp: <title> | arrays: numpy (CPU) | MPI: numpy buffers" --
    what runs, on which arrays, and how they reach MPI (``comm.transport()``)."""
    arrays = "numpy (CPU)" if backend.device() == "cpu" else "CuPy (GPU)"
    say(f"minitp: {title} | arrays: {arrays} | MPI: {comm.transport()}")


def verdict(ok, message, failure=None):
    """End a check, on every rank together (collective): "check: <message>" when ``ok`` holds on every
    rank; otherwise "check: FAILED: <failure>" (``message`` when no ``failure`` is given) and
    ``SystemExit(1)`` on every rank, so that the job's exit status says it and no rank is left waiting.

    The line is printed once, by rank 0, from rank 0's ``message``: reduce the numbers it quotes
    (``comm.allreduce(worst, op=MPI.MAX)``) before, so that it speaks for every rank."""
    if MPI.COMM_WORLD.allreduce(bool(ok), op=MPI.LAND):
        say(f"check: {message}")
        return
    say(f"check: FAILED: {message if failure is None else failure}")
    raise SystemExit(1)


_progress_shown = False


def progress(text):
    """Rewrite one line in place ("\\r"), from rank 0, only when stdout is a terminal: a long run shows
    every step without filling the screen, and a log file gets no carriage returns."""
    global _progress_shown
    if MPI.COMM_WORLD.Get_rank() == 0 and sys.stdout.isatty():
        print(f"\r{text}\033[K", end="", flush=True)
        _progress_shown = True


def end_progress():
    """Clear the progress line, if one is shown, so that the next line printed starts at column 0."""
    global _progress_shown
    if _progress_shown:
        print("\r\033[K", end="", flush=True)
        _progress_shown = False
