"""Checkpoints that outlive the mesh: one full, framework-independent file, whatever the run's tp and dp.

``save`` gathers every shard back into the serial model's arrays and writes ONE ``.npz`` -- numpy's zip
of ``.npy`` files, readable with nothing but ``numpy.load`` -- keyed by the serial parameter names::

    wte.weight, blocks.0.attention.qkv.weight, ...      the parameters, full (serial) shapes
    optimizer/step                                      how many steps the optimizer took
    optimizer/<buffer>/<parameter name>                 its per-parameter state (AdamW: exp_avg,
    optimizer/step/<parameter name>                     exp_avg_sq), gathered like the parameter
    dropout/<module name>                               each dropout's call counter (its masks go on
                                                        exactly where they stopped)
    checkpoint/step                                     the training step the caller passed
    checkpoint/config                                   the model's GPTConfig as JSON (models that have one)
    metadata/<key>                                      strings the caller passes (``metadata=``), e.g. the
                                                        vocabulary and a hash of the corpus, checked at load
    scaler/scale, scaler/clean_steps, scaler/skipped    a loss scaler's state (``scaler=``: mixed precision)

**Mixed precision.** With ``MasterWeights`` (an fp16 model, fp32 masters) the masters are optimizer state,
saved as ``optimizer/master/<name>`` in fp32 beside the fp32 moments, and loaded back in the master dtype
exactly: the master weights are what is saved, the fp16 parameters in the file are their rounding. A
bf16 model's arrays are written as float32 (exact; ``.npy`` has no bfloat16) and cast back at load. The
``DynamicLossScaler``'s state is no model or optimizer state, so ``save`` and ``load`` take it as
``scaler=`` (a resumed run must scale its loss by the same S, or its gradients round differently and it
skips other steps): with both, a resumed fp16 run takes exactly the steps the uninterrupted one takes.

``load`` cuts the file for any mesh: a checkpoint saved at tp=4 resumes at tp=2, or serially, and takes
exactly the steps the uninterrupted run takes. A ZeRO-1 optimizer (``minitp.parallel.data.zero``) is saved
full, gathered over dp first, and loaded by keeping each dp rank's slices: the file does not say
whether the run was sharded.

**Pipeline stages** each hold other layers: at save the first stage collects the other stages' arrays
(an mpi4py ``gather`` over pp, pickled in memory; the first stage's copy of a tied table is the one
kept), and at load rank 0 checks the file against every stage's names before anything is cut.

**A checkpoint is data, not code.** It is read with ``allow_pickle=False``: a file holding pickled
objects is refused instead of executed. And every value in it is checked against what ``save`` writes
before anything is loaded (``fit.py``): a NaN weight, a negative step or counter, a parameter whose
optimizer state is gone, a file that is no ``.npz`` at all -- each refused in one line naming the entry.

**One rank writes, one rank reads.** World rank 0 writes the file (to a temporary name in the same
directory, then ``os.replace``: a rename is atomic, so a save that fails part-way leaves the previous
checkpoint intact) and at load reads it, checks it against the model, and broadcasts its verdict and
then the arrays. Every rank so raises the same error, naming the parameter -- nobody is left waiting in
a collective -- and no other rank needs to see rank 0's filesystem.

Four files, one question each: ``writing.py`` (``save``, ``check_writable``: gather and write),
``reading.py`` (``load``: read, check, broadcast, cut), ``fit.py`` (does a file fit this model? every
problem, one line each) and ``contents.py`` (what a checkpoint of this model must hold, and the
pipeline stages' parts merged).
"""
from minitp.checkpoint.reading import load
from minitp.checkpoint.writing import check_writable, save

__all__ = ["save", "load", "check_writable"]
