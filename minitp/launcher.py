"""Starting an MPI job from Python: which ``mpiexec``, with which flags, in which environment.

minitp itself never launches anything: ``mpiexec -n N python script.py`` starts the ranks. But the tests,
the tutorials' test runner, the benchmarks' driver and ``tests/run-mpi`` do start jobs of their own, and
they all ask this module, so that they agree on one launcher:

- ``mpiexec()``: ``$MPIEXEC`` if set, else the ``mpiexec`` beside this Python (the venv's, from the PyPI
  ``mpich`` wheel), else the first ``mpiexec`` on PATH (a system or cluster MPI).
- ``command(n)``: that launcher with the flags its family needs to run a test suite anywhere, then
  ``$MPIEXEC_FLAGS`` (your own, split like a shell would), then ``-n n``. Open MPI refuses to run as root
  and to start more ranks than cores; a test suite does both on a small machine, so Open MPI gets
  ``--oversubscribe``, and ``--allow-run-as-root`` when run as root. MPICH's Hydra needs neither.
- ``environment()``: this process's environment without a parent job's identity, for a launch made
  from inside an MPI job (``mpiexec -n 4 python -m pytest`` running a test that launches a tutorial):
  the child must start a job of its own, not try to join ours. Only what a launcher sets to tell a
  rank who it is goes; your own settings (``OMPI_ALLOW_RUN_AS_ROOT``, ``OMPI_MCA_rmaps_base_oversubscribe``,
  ``MPIR_CVAR_*``, ``HYDRA_*``, ``PMIX_MCA_*``, ...) stay.

``python -m minitp.launcher [N]`` prints the command, quoted for a shell (what ``tests/run-mpi`` and
``make tutorial`` run), and ``python -m minitp.launcher --explain`` says how it was chosen.
"""
import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# What a launcher puts in each rank's environment to tell it which job and rank it is (checked against
# Open MPI 4.1 and MPICH 4.0/5.0's Hydra; PMIx and OMPI_COMM_WORLD_* are also what Open MPI 5 sets).
JOB_IDENTITY = (
    "PMI_",                      # MPICH/Hydra, Intel MPI, Slurm's PMI-1/2: rank, size, the server's fd or port
    "PMIX_",                     # PMIx (Open MPI 4 and 5, Slurm): namespace, rank, server URI
    "HYDI_",                     # Hydra's proxy: its control fd
    "MPI_LOCALRANKID", "MPI_LOCALNRANKS",  # Hydra: the rank on this node
    "OMPI_COMM_WORLD_", "OMPI_UNIVERSE_SIZE", "OMPI_APP_CTX_NUM_PROCS", "OMPI_NUM_APP_CTX", "OMPI_FIRST_RANKS",
    "OMPI_COMMAND", "OMPI_ARGV", "OMPI_FILE_LOCATION",  # Open MPI: this rank, this job, this node
    "OMPI_MCA_orte_", "OMPI_MCA_ess", "OMPI_MCA_pmix", "OMPI_MCA_initial_wdir", "OMPI_MCA_mpi_oversubscribe",
    "OMPI_MCA_shmem_RUNTIME_QUERY_hint",                # Open MPI 4: how this rank reaches its daemon
    "_PYTEST_MPI_CHILD_PROCESS",  # mpi-pytest: "this process is a test's rank"
)
# ...except the user's own settings that happen to share a prefix with them
USER_SETTINGS = ("PMIX_MCA_",)


def mpiexec():
    """The launcher's path: ``$MPIEXEC`` (a path, or a name looked up on PATH), else the ``mpiexec``
    beside this Python (the venv's PyPI MPICH), else PATH's. None if there is none."""
    if os.environ.get("MPIEXEC"):
        return shutil.which(os.environ["MPIEXEC"]) or os.environ["MPIEXEC"]
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


@functools.lru_cache(maxsize=None)
def version(program):
    """The first line ``program --version`` prints that names it ('' if it cannot be run)."""
    try:
        done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30,
                              env=environment())
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def family(program=None):
    """'open-mpi' (mpirun/prterun), 'hydra' (MPICH, Intel MPI, MVAPICH) or 'unknown', from ``--version``."""
    text = version(program or mpiexec() or "mpiexec").lower()
    if "open mpi" in text or "openrte" in text or "open-mpi" in text or "prte" in text:
        return "open-mpi"
    if "hydra" in text or "mpich" in text or "intel(r) mpi" in text:
        return "hydra"
    return "unknown"


def flags(program=None):
    """The flags this launcher's family needs to run the suite as root on a machine with few cores,
    then ``$MPIEXEC_FLAGS``."""
    words = []
    if family(program) == "open-mpi":
        words.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            words.append("--allow-run-as-root")
    return words + shlex.split(os.environ.get("MPIEXEC_FLAGS", ""))


def command(ranks=None):
    """``[mpiexec, flags..., "-n", ranks]`` (without ``-n`` for ``ranks=None``, to add an MPMD line)."""
    program = mpiexec()
    if program is None:
        raise FileNotFoundError("no mpiexec: neither $MPIEXEC, nor one beside this Python (make venv), "
                                "nor one on PATH")
    return [program, *flags(program)] + ([] if ranks is None else ["-n", str(ranks)])


def is_job_identity(name):
    return name.startswith(JOB_IDENTITY) and not name.startswith(USER_SETTINGS)


def environment(extra=None):
    """This process's environment without a parent MPI job's identity, updated with ``extra`` (a value
    of None removes that variable)."""
    env = {name: value for name, value in os.environ.items() if not is_job_identity(name)}
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def explain():
    program = mpiexec()
    source = ("$MPIEXEC" if os.environ.get("MPIEXEC") else
              "beside this Python" if program == str(Path(sys.executable).parent / "mpiexec") else "PATH")
    lines = [line.strip() for line in version(program).splitlines() if line.strip()] if program else ["-"]
    first = " ".join(lines[:1] + [" ".join(line.split()) for line in lines[1:] if line.startswith("Version:")][:1])
    return "\n".join([
        f"launcher:  {program or 'none found'} (from {source})",
        f"version:   {first or '?'}",
        f"family:    {family(program) if program else '-'}",
        f"flags:     {shlex.join(flags(program)) if program else '-'}"
        f"   (MPIEXEC_FLAGS={os.environ.get('MPIEXEC_FLAGS', '')!r})",
    ])


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments == ["--explain"]:
        print(explain())
    else:
        try:
            print(shlex.join(command(arguments[0] if arguments else None)))
        except FileNotFoundError as error:
            sys.exit(str(error))
