#!/bin/sh
# The venv for a GPU machine that has no network (make gpu-check WHEELS=DIR).
#
# A GPU image usually holds CuPy, numpy and pytest under its python3, but no MPI library. So the venv
# takes those from python3 through a .pth file, and MPI from wheels carried in DIR. (A venv made with
# --system-site-packages would see the base interpreter's packages, not those of a python3 that is
# itself a venv, as it often is in such images.) minitp itself is put on the path by the same .pth file,
# so nothing is built there.
#
# Make DIR on a machine with network, for the GPU machine's Python (3.12 here) and processor:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d DIR mpich mpi4py mpi-pytest pytest-timeout ml_dtypes
# (the same versions as the CPU venv's, `pip list` there; ml_dtypes, numpy's bfloat16, which minitp imports,
# is rarely in a CUDA image). pip's --target would drop MPICH's lib/: a venv keeps it.
set -eu
WHEELS=${1:?usage: benchmarks/gpu_venv.sh WHEELS_DIR}
HOST_PYTHON=${HOST_PYTHON:-python3}
cd "$(dirname "$0")/.."
"$HOST_PYTHON" -c "import cupy, numpy, pytest" \
  || { echo "$HOST_PYTHON lacks CuPy, numpy or pytest: carry their wheels in $WHEELS too"; exit 1; }
"$HOST_PYTHON" -m venv .venv
inner=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
{ pwd; "$HOST_PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))'; } > "$inner/gpu-image.pth"
# --ignore-installed: the image may hold an mpi4py of its own, built against an MPI it does not have
.venv/bin/python -m pip install -q --no-index --no-deps --ignore-installed "$WHEELS"/*.whl
touch .venv/bin/.installed-pypi  # what make's venv target looks for
.venv/bin/python -c "import cupy, ml_dtypes, minitp; from mpi4py import MPI; print('venv ready:', MPI.Get_library_version().splitlines()[0], '| CuPy', cupy.__version__)"
