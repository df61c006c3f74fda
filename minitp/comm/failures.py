"""How does a job end when one rank fails or leaves? Within seconds, with one message that says why.

MPI has no notion of "the job failed": a rank that raises, or returns, or calls ``sys.exit`` simply stops,
and the ranks waiting for it in their next collective wait forever while ``mpirun`` prints nothing.
``install_abort_handler()`` (called on import of ``minitp.comm`` and by ``comm.init``) handles the three
ways a rank stops:

- **an unhandled exception**: the rank tells the others (a point-to-point message with a tag of its
  own, never a collective, which could be mismatched with one the others are in) and waits up to
  ``MINITP_ERROR_WAIT`` seconds (default 0.5) for theirs. If every rank failed -- a configuration error
  raised alike everywhere -- rank 0 prints the traceback once ("the same on all 4 ranks"), and every
  rank exits with status 1. If it failed alone, it prints its traceback, prefixed ``[rank r]``, and
  aborts the job.
- **``sys.exit(status)``**, or the end of the script: at exit the rank tells the others it is leaving and
  waits for them to leave too -- up to ``MINITP_EXIT_WAIT`` seconds (default 10; 0: forever) after a
  normal end, ``MINITP_ERROR_WAIT`` after ``sys.exit`` with a non-zero status. When every rank leaves,
  the job ends as usual (the highest status wins). When some do not, the rank that left says so, naming
  itself and the ranks still running, and aborts the job rather than leave them waiting forever.
  (A rank that legitimately works on alone for longer than ``MINITP_EXIT_WAIT`` after the others have
  finished needs a larger value.)

With one rank nothing changes: Python's own handling is kept.
"""
import atexit
import os
import sys
import time
import traceback

from mpi4py import MPI

_ERROR_TAG, _EXIT_TAG, _PRINTED_TAG = 0x6D74E0, 0x6D74E1, 0x6D74E2  # minitp's own tags: no algorithm uses them
_state = {"installed": False, "status": None, "handled": False}


def _seconds(variable, default):
    try:
        return float(os.environ.get(variable) or default)
    except ValueError:
        return default


def _handshake(tag, payload, wait):
    """Send ``payload`` to every other rank with ``tag`` and collect theirs for up to ``wait`` seconds
    (forever when ``wait`` is 0, not at all when it is negative). Returns {rank: payload} of the ranks
    heard from, this one included."""
    world = MPI.COMM_WORLD
    me, size = world.Get_rank(), world.Get_size()
    for other in range(size):
        if other != me:
            world.isend(payload, dest=other, tag=tag)  # buffered by MPI; never waited for: we may abort
    heard = {me: payload}
    if wait < 0:
        return heard
    deadline = time.monotonic() + wait if wait > 0 else float("inf")
    while len(heard) < size and time.monotonic() < deadline:
        status = MPI.Status()
        if world.iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
            heard[status.Get_source()] = world.recv(source=status.Get_source(), tag=tag)
        else:
            time.sleep(0.001)
    return heard


def _hear_from(source, tag, wait):
    """Wait up to ``wait`` seconds for one message from ``source`` with ``tag``; whether it came."""
    world, deadline = MPI.COMM_WORLD, time.monotonic() + wait
    while time.monotonic() < deadline:
        if world.iprobe(source=source, tag=tag):
            world.recv(source=source, tag=tag)
            return True
        time.sleep(0.001)
    return False


def _say(text):
    sys.stdout.flush()
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def _abort(world, code):
    """MPI_Abort, a moment after the message just said: the abort tears down the launcher's proxies, and
    one that had not yet forwarded this rank's last stderr lost it -- the job ended with no word of why
    (seen on a loaded 2-core machine, about one run in a hundred). A quarter of a second lets it drain."""
    time.sleep(0.25)
    world.Abort(code)


def _on_exception(previous):
    def abort_on_exception(kind, value, trace):
        world = MPI.COMM_WORLD
        if world.Get_size() == 1 or MPI.Is_finalized():
            previous(kind, value, trace)
            return
        _state["handled"] = True
        me, size = world.Get_rank(), world.Get_size()
        text = "".join(traceback.format_exception(kind, value, trace)).rstrip("\n")
        message = "".join(traceback.format_exception_only(kind, value)).strip()
        heard = _handshake(_ERROR_TAG, message, _seconds("MINITP_ERROR_WAIT", 0.5))
        if len(heard) == size:  # every rank failed: say it once, end cleanly
            if me == 0:
                same = all(other == message for other in heard.values())
                _say(text + (f"\n(the same on all {size} ranks)" if same else "\n" + "\n".join(
                    f"[rank {rank}] {other}" for rank, other in sorted(heard.items()) if other != message)))
                _handshake(_PRINTED_TAG, True, wait=-1)  # tell the others it is printed; wait for nobody
            else:
                # Wait for rank 0's word that the traceback is written: a rank exiting with status 1 first
                # makes the launcher kill the job, and rank 0 could die with its message unwritten.
                # (0, "forever" for the handshakes, is 10 s here: a lost word must not keep a rank alive)
                _hear_from(0, _PRINTED_TAG, _seconds("MINITP_EXIT_WAIT", 10) or 10)
            os._exit(1)
        prefix = f"[rank {me}] "  # every line prefixed: the ranks' outputs may interleave on a terminal
        _say("".join(prefix + line + "\n" for line in text.split("\n")) + f"{prefix}aborting all {size} ranks")
        _abort(world, 1)

    abort_on_exception.minitp_abort = True
    return abort_on_exception


def _exit(status=None):
    """``sys.exit``, remembering the status for the exit handshake (a rank leaving with an error status
    alone is ended quickly)."""
    _state["status"] = status
    raise SystemExit(status)


def _at_exit():
    world = MPI.COMM_WORLD
    if world.Get_size() == 1 or MPI.Is_finalized() or _state["handled"]:
        return
    status = _state["status"]
    code = status if isinstance(status, int) else (0 if status is None else 1)
    wait = _seconds("MINITP_ERROR_WAIT", 0.5) if code else _seconds("MINITP_EXIT_WAIT", 10)
    heard = _handshake(_EXIT_TAG, code, wait)
    if len(heard) == world.Get_size():
        return
    me = world.Get_rank()
    missing = sorted(set(range(world.Get_size())) - set(heard))
    how = f"sys.exit({status!r})" if status is not None else "the end of its script"
    _say(f"[rank {me}] left the job ({how}) while rank(s) {missing} had not: they would wait for it forever, "
         f"so all {world.Get_size()} ranks are aborted" + (f" (MINITP_EXIT_WAIT={wait:g} s)" if not code else ""))
    _abort(world, code or 1)


def install_abort_handler():
    """End the whole job, with one clear message, when any rank raises or leaves (see the module
    docstring). Safe to call more than once."""
    if _state["installed"]:
        return
    _state["installed"] = True
    sys.excepthook = _on_exception(sys.excepthook)
    sys.exit = _exit
    atexit.register(_at_exit)  # runs before mpi4py's MPI_Finalize, which was registered earlier
