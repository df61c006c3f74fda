# minitp: two commands.
#   make test       create .venv (numpy, ml_dtypes, mpi4py, MPICH from PyPI, pytest + mpi-pytest + pytest-timeout),
#                   then run every test: serial, then 2, 3, 4 and 8 ranks, each rank count in one mpiexec
#                   (8: context parallelism and pipelines with tp = 2, oversubscribed on a small machine: tiny sizes)
#   make tutorial   mpirun -n 4 python tutorials/mlp.py
# and, not part of the tests:
#   make bench      activation memory, communication and speed against the papers and PyTorch, context
#                   parallelism's bytes and balance, pipeline bubbles, overlap, and the experts' all-to-all
#                   bytes, load and drops (benchmarks/)
#   make gpu-check  on a machine with a GPU: the suite on CuPy, the tutorials and --check on CuPy, the block's
#                   FLOP/s, staged vs CUDA-aware MPI (WHEELS=DIR: no network there, MPI wheels carried);
#                   QUICK=1: only the fused kernels' tests and the block and attention against PyTorch on CUDA
# A system MPI instead of the PyPI one: make test MPI=system (mpi4py then builds against your mpicc).
#   make test-debian-mpi MPI_PACKAGES=openmpi|mpich  (root, Debian/Ubuntu): install that MPI if missing,
#                   run make test MPI=system in a fresh clone, remove what it installed.
# Every launch (tests, tutorial, benchmarks) asks minitp.launcher for mpiexec: $MPIEXEC, else the venv's,
# else PATH's; with Open MPI, --oversubscribe and (as root) --allow-run-as-root; then $MPIEXEC_FLAGS.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MPI    ?= pypi
NP     ?= 4

ifeq ($(MPI),system)
EXTRAS  := test,bench
else ifeq ($(MPI),pypi)
EXTRAS  := test,bench,mpi
else
$(error MPI=$(MPI): say MPI=pypi (the default: MPICH from PyPI) or MPI=system (the mpicc and mpiexec on PATH))
endif
OTHER_MPI := $(if $(filter system,$(MPI)),pypi,system)

# One BLAS thread per rank: ranks share this machine's cores, and threads on top of ranks only fight.
export OMP_NUM_THREADS = 1
export OPENBLAS_NUM_THREADS = 1
export MKL_NUM_THREADS = 1

.PHONY: venv test tutorial bench gpu-check test-debian-mpi clean

venv: $(BIN)/.installed-$(MPI)

# One venv per MPI: switching MPI= starts a fresh one. Under MPI=system, mpi4py is compiled against the
# mpicc on PATH, bypassing pip's cache: a wheel cached from another MPI would load that MPI's library, and
# every rank would then run alone (a 1-rank job each).
$(BIN)/.installed-$(MPI): setup.cfg pyproject.toml
	@for stamp in $(BIN)/.installed-$(OTHER_MPI) $(BIN)/.installed; do \
	  if [ -e $$stamp ]; then echo "$(VENV) was made for another MPI (or by an older Makefile): making it afresh"; rm -rf $(VENV); break; fi; done
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(MPI),system)
	@command -v mpicc > /dev/null || { echo "MPI=system needs mpicc (and mpiexec) on PATH, e.g. apt-get install openmpi-bin libopenmpi-dev, or mpich libmpich-dev"; exit 1; }
	$(BIN)/python -m pip install -q --no-cache-dir --no-binary mpi4py mpi4py
endif
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q -m "parallel[1]"
	tests/run-mpi 2 3 4 8

tutorial: venv
	$$($(BIN)/python -m minitp.launcher $(NP)) $(BIN)/python tutorials/mlp.py

# PyTorch only for the speed comparison, the CPU build (the default wheel brings gigabytes of CUDA);
# speed.py skips the PyTorch rows, saying so, where it cannot be had. Not installed again when present;
# an index that cannot be reached fails at once (no retries, 10 s without an answer) instead of pip's
# default five retries with back-off, each waiting up to its timeout.
TORCH_VERSION := 2.13.0
TORCH         := torch==$(TORCH_VERSION)
PIP_QUICK     := --retries 0 --timeout 10
HAVE_TORCH    := $(BIN)/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')"
bench: venv
	@$(HAVE_TORCH) 2> /dev/null \
	  || $(BIN)/python -m pip install -q $(PIP_QUICK) $(TORCH) --index-url https://download.pytorch.org/whl/cpu \
	  || $(BIN)/python -m pip install -q $(PIP_QUICK) $(TORCH) \
	  || echo "$(TORCH) unavailable: speed.py will skip the PyTorch rows"
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/comm.py
	$(BIN)/python benchmarks/collectives.py
	$(BIN)/python benchmarks/context.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/overlap.py
	$(BIN)/python benchmarks/zero.py
	$(BIN)/python benchmarks/precision.py
	$(BIN)/python benchmarks/experts.py

# CuPy: the one already installed where there is one (a GPU image usually has it), else cupy-cuda12x from
# PyPI. On a GPU machine without network, WHEELS=DIR makes the venv from python3's own packages (CuPy,
# numpy, pytest) and the MPI wheels carried in DIR (benchmarks/gpu_venv.sh says how to make DIR).
WHEELS ?=
gpu-check:
	@if [ -n "$(WHEELS)" ] && [ ! -e $(BIN)/.installed-$(MPI) ]; then benchmarks/gpu_venv.sh $(WHEELS); fi
	@$(MAKE) --no-print-directory venv
	@$(BIN)/python -c "import cupy" 2> /dev/null || $(BIN)/python -m pip install -q cupy-cuda12x
	QUICK=$(QUICK) PYTHON=$(BIN)/python benchmarks/gpu_check.sh

# The suite against a Debian MPI, the way a new user meets it: .ci/debian-mpi installs the packages if
# missing (root), runs make test MPI=system in a fresh clone of HEAD and removes what it installed.
MPI_PACKAGES ?= openmpi
test-debian-mpi:
	.ci/debian-mpi $(MPI_PACKAGES)

clean:
	rm -rf $(VENV) .pytest-logs *.egg-info
