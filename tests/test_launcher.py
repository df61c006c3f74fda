"""minitp.launcher: which mpiexec every launch uses, its flags by family, and the environment a nested
launch gets (a parent job's identity dropped, the user's own settings kept). Fake launchers stand in for
Open MPI and Hydra, so these run whatever MPI this machine has."""
import os
import sys
from pathlib import Path

import pytest

from minitp import launcher

ROOT_FLAG = ["--allow-run-as-root"] if os.geteuid() == 0 else []


def fake_mpiexec(directory, version_text):
    path = Path(directory) / "mpiexec"
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version_text}\nEOF\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def clean(monkeypatch):
    for name in ("MPIEXEC", "MPIEXEC_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_open_mpi_gets_oversubscribe_and_as_root_allow_run_as_root_then_the_users_flags(tmp_path, clean):
    program = fake_mpiexec(tmp_path, "mpiexec (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/")
    clean.setenv("MPIEXEC", program)
    assert launcher.family() == "open-mpi"
    assert launcher.command(4) == [program, "--oversubscribe", *ROOT_FLAG, "-n", "4"]
    clean.setenv("MPIEXEC_FLAGS", "--mca btl self,vader --hostfile 'my hosts'")
    assert launcher.command(2) == [program, "--oversubscribe", *ROOT_FLAG, "--mca", "btl", "self,vader",
                                   "--hostfile", "my hosts", "-n", "2"]


def test_open_mpi_5_is_open_mpi_too(tmp_path, clean):
    clean.setenv("MPIEXEC", fake_mpiexec(tmp_path, "mpiexec (Open MPI) 5.0.7\n\nReport bugs to ..."))
    assert launcher.family() == "open-mpi"


def test_hydra_needs_no_flags(tmp_path, clean):
    program = fake_mpiexec(tmp_path, "HYDRA build details:\n    Version:                                 4.0.2")
    clean.setenv("MPIEXEC", program)
    assert launcher.family() == "hydra"
    assert launcher.command(3) == [program, "-n", "3"]
    assert launcher.command() == [program]


def test_the_launcher_is_MPIEXEC_else_the_one_beside_python_else_PATHs(tmp_path, clean):
    clean.setenv("MPIEXEC", str(tmp_path / "my-mpiexec"))
    assert launcher.mpiexec() == str(tmp_path / "my-mpiexec")
    clean.delenv("MPIEXEC")
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        assert launcher.mpiexec() == str(beside)
    else:
        on_path = fake_mpiexec(tmp_path, "HYDRA")
        clean.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
        assert launcher.mpiexec() == on_path


def test_no_launcher_is_a_clear_error(tmp_path, clean):
    clean.setattr(launcher, "mpiexec", lambda: None)
    with pytest.raises(FileNotFoundError, match="no mpiexec"):
        launcher.command(2)


def test_a_nested_launch_drops_the_parent_jobs_identity_and_keeps_the_users_settings(clean):
    identity = {  # what Open MPI 4.1's mpirun, Hydra and mpi-pytest set in a rank's environment
        "PMI_RANK": "1", "PMI_SIZE": "4", "PMI_FD": "9", "PMIX_RANK": "0", "PMIX_NAMESPACE": "371851265",
        "PMIX_SERVER_URI4": "x", "HYDI_CONTROL_FD": "7", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1",
        "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_UNIVERSE_SIZE": "2",
        "OMPI_MCA_ess": "^singleton", "OMPI_MCA_ess_base_jobid": "1", "OMPI_MCA_orte_hnp_uri": "x",
        "OMPI_MCA_pmix": "^s1,s2", "OMPI_MCA_mpi_oversubscribe": "0", "OMPI_FILE_LOCATION": "/tmp/x",
        "_PYTEST_MPI_CHILD_PROCESS": "1"}
    user = {  # what a user sets to run Open MPI as root, oversubscribed, or to tune MPICH or PMIx
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl": "self,vader", "PMIX_MCA_gds": "hash",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "MPIR_CVAR_CH4_NETMOD": "ofi",
        "HYDRA_HOST_FILE": "/etc/hosts.mpi", "MPIEXEC_FLAGS": "--oversubscribe"}
    for name, value in {**identity, **user}.items():
        clean.setenv(name, value)
    env = launcher.environment({"OMP_NUM_THREADS": "1", "PATH": None})
    assert not set(identity) & set(env)
    assert {name: env.get(name) for name in user} == user
    assert env["OMP_NUM_THREADS"] == "1" and "PATH" not in env
