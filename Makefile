# minitp: two commands.
#   make test       create .venv (numpy, mpi4py, MPICH from PyPI, pytest + mpi-pytest + pytest-timeout),
#                   then run every test: serial, then 2, 3, 4 and 8 ranks, each rank count in one mpiexec
#                   (8: context parallelism and pipelines with tp = 2, oversubscribed on a small machine: tiny sizes)
#   make tutorial   mpirun -n 4 python tutorials/mlp.py
# and, not part of the tests:
#   make bench      activation memory, communication and speed against the papers and PyTorch, context
#                   parallelism's bytes and balance, pipeline bubbles, and overlap (benchmarks/)
#   make gpu-check  on a machine with a GPU: the suite on CuPy, the block's FLOP/s, staged vs CUDA-aware MPI
# A system MPI instead of the PyPI one: make test MPI=system (mpi4py then builds against your mpicc).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MPI    ?= pypi
NP     ?= 4

ifeq ($(MPI),system)
EXTRAS  := test,bench
MPIEXEC ?= mpiexec
PIP_MPI := --no-binary mpi4py
else
EXTRAS  := test,bench,mpi
MPIEXEC ?= $(BIN)/mpiexec
PIP_MPI :=
endif

# One BLAS thread per rank: ranks share this machine's cores, and threads on top of ranks only fight.
export OMP_NUM_THREADS = 1
export OPENBLAS_NUM_THREADS = 1
export MKL_NUM_THREADS = 1

.PHONY: venv test tutorial bench gpu-check clean

venv: $(BIN)/.installed

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_MPI) -e '.[$(EXTRAS)]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q -m "parallel[1]"
	MPIEXEC=$(MPIEXEC) tests/run-mpi 2 3 4 8

tutorial: venv
	$(MPIEXEC) -n $(NP) $(BIN)/python tutorials/mlp.py

# PyTorch only for the speed comparison, the CPU build (the default wheel brings gigabytes of CUDA);
# speed.py skips the PyTorch rows, saying so, where it cannot be had.
bench: venv
	$(BIN)/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
	  || $(BIN)/python -m pip install -q torch==2.13.0 \
	  || echo "torch 2.13.0 unavailable: speed.py will skip the PyTorch rows"
	MPIEXEC=$(MPIEXEC) $(BIN)/python benchmarks/memory.py
	MPIEXEC=$(MPIEXEC) $(BIN)/python benchmarks/comm.py
	MPIEXEC=$(MPIEXEC) $(BIN)/python benchmarks/collectives.py
	MPIEXEC=$(MPIEXEC) $(BIN)/python benchmarks/context.py
	MPIEXEC=$(MPIEXEC) $(BIN)/python benchmarks/pipeline.py
	MPIEXEC=$(MPIEXEC) $(BIN)/python benchmarks/speed.py
	MPIEXEC=$(MPIEXEC) $(BIN)/python benchmarks/overlap.py

gpu-check: venv
	$(BIN)/python -m pip install -q cupy-cuda12x
	MPIEXEC=$(MPIEXEC) PYTHON=$(BIN)/python benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest-logs *.egg-info
