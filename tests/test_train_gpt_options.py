"""tutorials/train_gpt.py's command line at its edges: every option's bad values end the run with one
`error:` line and status 2 before any step; the few edges that are not errors do what is written here.
In process (``main(argv)``, one rank): validation runs before any collective, so this is fast.

Also the runs that once trained the wrong steps (a --trace window that repeated or skipped steps, a
resume with nothing to train), the frozen default text that the README's figures are measured on,
checked mode on by default, and the README's advice for a rank that raises before importing minitp."""
import argparse
import re
import subprocess
import sys
import types

import pytest
from mpi4py import MPI

from minitp import comm, launcher
from minitp.comm import checks
from test_train_gpt import tutorial
from tutorial_runner import ROOT, needs_mpiexec

# a model small enough that a step is a few milliseconds; the option under test comes after and wins
TINY = ["--hidden", "16", "--layers", "1", "--seq", "8", "--batch", "4", "--sample", "0", "--steps", "1"]


def outcome(train_gpt, argv, capsys):
    """(exit status, stdout, stderr) of ``train_gpt.main(TINY + argv)``; argparse's exit counts as a status."""
    try:
        status = train_gpt.main(TINY + argv)
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(status, out, err, message):
    """Status 2, exactly one `error:` line saying ``message``, no traceback, and no step trained."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and message in errors[0], (status, err)
    assert "Traceback" not in err and not re.search(r"^step ", out, re.M), out + err


@pytest.fixture(scope="module")
def train_gpt():
    return tutorial()


@pytest.fixture
def files(tmp_path):
    """Paths for the edges: a directory, a missing file, an empty text, a text of 5 characters, a non-checkpoint."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "five.txt").write_text("abcde" * 40)
    (tmp_path / "hello.npz").write_text("hello\n")
    return types.SimpleNamespace(dir=str(tmp_path), missing=str(tmp_path / "missing" / "x"),
                                 empty=str(tmp_path / "empty.txt"), five=str(tmp_path / "five.txt"),
                                 hello=str(tmp_path / "hello.npz"), tmp=tmp_path)


HUGE = str(10 ** 9)
# sizes whose arrays exceed any 64-bit machine's address space (2^47 B = 128 TiB): numpy's allocation fails
# at once, even where the kernel overcommits memory -- a test must not start filling a real 400 GiB
IMPOSSIBLE = str(10 ** 14)

# (options, what the one error line says); "{dir}" and friends are the paths of the ``files`` fixture
REFUSED = [
    # integers: 0, negative, the wrong type (argparse's own error line), and what the mesh cannot hold at 1 rank
    *[([f"--{name}", value], f"--{name} must be a positive integer, not {value}")
      for name in ("tp", "dp", "cp", "pp", "microbatches", "virtual-stages", "steps", "batch", "seq", "hidden",
                   "heads", "layers", "log-every", "trace-steps") for value in ("0", "-1")],
    *[([f"--{name}", "abc"], f"argument --{name}: invalid int value: 'abc'")
      for name in ("tp", "steps", "batch", "seed", "sample", "save-every", "trace-steps")],
    (["--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
    (["--dp", "2"], "dp × pp × cp × tp must equal the number of ranks: 2 × 1 × 1 × 1 ≠ 1"),
    (["--tp", "2"], "must equal the number of ranks"),
    (["--cp", "2"], "must equal the number of ranks"),
    (["--pp", "2"], "must equal the number of ranks"),
    (["--microbatches", "3"], "is not divisible by 3 microbatches"),
    (["--virtual-stages", "2"], "--virtual-stages 2 cuts each pipeline stage into chunks: it needs --schedule "
                                "interleaved and --pp 2 or more"),
    (["--seq", HUGE], f"too few for windows of --seq {HUGE} + 1"),
    (["--hidden", IMPOSSIBLE], "the model does not fit in memory (Unable to allocate"),
    (["--heads", "3"], "--heads 3 must divide --hidden 16"),
    (["--seed", "-1"], "--seed must be 0 or more, not -1"),  # numpy's generator raised at the first step
    (["--sample", "-1"], "--sample must be 0 or more, not -1"),
    (["--sample", HUGE], "--sample must be at most 100,000 characters"),
    (["--save-every", "-1"], "--save-every must be 0 or more, not -1"),
    (["--save-every", "2"], "--save-every 2 saves to the --save path: pass --save PATH too"),  # saved nothing
    # the lr schedule and the held-out loss
    *[(["--warmup", value], f"--warmup must be in [0, --steps 1), not {value}") for value in ("-1", "1")],
    (["--warmup", "1.5"], "argument --warmup: invalid int value: '1.5'"),
    *[(["--lr-min", value], f"--lr-min must be a finite number in [0, --lr 0.003], not {value}")
      for value in ("-1", "nan", "inf", "0.004")],
    (["--eval-every", "-1"], "--eval-every must be 0 or more, not -1"),
    *[(["--eval-batches", value], f"--eval-batches must be a positive integer, not {value}") for value in ("0", "-1")],
    (["--text", "{five}", "--seq", "40"], "the held-out last 10% of the text has 20 characters: too few for "
                                          "windows of --seq 40 + 1"),
    (["--text", "{five}", "--seq", "185"], "the text has 200 characters, 180 of them for training (the last 10% "
                                           "held out): too few for windows of --seq 185 + 1"),
    # floats: 0, negative, NaN, inf, the wrong type
    *[(["--dropout", value], f"--dropout must be in [0, 1), not {value}") for value in ("-0.1", "1", "nan", "inf")],
    *[(["--lr", value], f"--lr must be a finite positive number, not {value}") for value in ("0", "-1", "nan", "inf")],
    *[(["--weight-decay", value], f"--weight-decay must be a finite number >= 0, not {value}")
      for value in ("-1", "nan", "inf")],
    *[(["--max-norm", value], f"--max-norm must be a finite positive number") for value in ("0", "-1", "nan", "inf")],
    *[(["--temperature", value], "--temperature must be a finite number >= 0") for value in ("-1", "nan", "inf")],
    *[(["--bucket-mb", value], f"--bucket-mb must be a positive size, not {value}") for value in ("0", "-1", "nan")],
    (["--lr", "1e308"], "--lr × --weight-decay must be below 1, not 1e+308 × 0.01"),  # flipped every weight's sign
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    # choices
    (["--cp-kind", "spiral"], "argument --cp-kind: invalid choice: 'spiral'"),
    (["--schedule", "zigzag"], "argument --schedule: invalid choice: 'zigzag'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--zero", "4"], "argument --zero: invalid choice: 4"),
    # mixed precision: fp32 gradient reduction of a model that is not 2-byte
    (["--grad-reduce", "fp32"], "--grad-reduce fp32 is for a --dtype fp16 or bf16 model: a float32 model's"),
    (["--dtype", "float64", "--grad-reduce", "fp32"], "--grad-reduce fp32 is for a --dtype fp16 or bf16 model"),
    (["--zero", "3", "--microbatches", "2"], "--zero 3 with --pp 1 / --microbatches 2: each block's gradient"),
    # files: missing, a directory, empty, not what it should be
    (["--text", "{missing}"], "--text {missing}: no such file"),
    (["--text", "{dir}"], "--text {dir}: a directory, not a file"),
    (["--text", "{empty}"], "the text has 0 characters: too few for windows of --seq 8 + 1"),
    (["--load", "{missing}"], "--load {missing}: no such file"),
    (["--load", "{dir}"], "--load {dir}: a directory, not a file"),
    (["--load", "{hello}"], "is not an .npz archive"),
    (["--save", "{missing}"], "cannot save a checkpoint at {missing}"),
    (["--save", "{dir}"], "cannot save a checkpoint at {dir}"),  # trained, then IsADirectoryError
    (["--trace", "{missing}"], "cannot write the trace to {missing}"),
    (["--trace", "{dir}"], "cannot write the trace to {dir}"),
    # combinations that would be ignored in silence
    (["--check", "--trace", "{tmp}/t.json"], "--check trains its own tiny model twice, checked, and saves, loads "
                                             "and traces nothing"),  # wrote no trace
    (["--check", "--save", "{tmp}/c.npz"], "--check trains its own tiny model twice"),
    (["--check", "--unchecked"], "drop --save, --load, --trace and --unchecked"),
]


@pytest.mark.parametrize("options, message", REFUSED, ids=[" ".join(options) for options, _ in REFUSED])
def test_every_option_at_its_edges_is_one_error_line_and_status_2_before_any_step(train_gpt, files, options,
                                                                                   message, capsys):
    paths = vars(files)
    status, out, err = outcome(train_gpt, [option.format(**paths) for option in options], capsys)
    assert_refused(status, out, err, message.format(**paths))


def test_edges_that_are_not_errors_do_what_they_say(train_gpt, tmp_path, capsys):
    """A --log-every beyond --steps logs the first and the last step; a --save-every beyond --steps saves
    at the end only; an infinite --bucket-mb is accepted (one bucket for everything); a --trace-steps beyond
    --steps traces the steps there are (after the first)."""
    status, out, _ = outcome(train_gpt, ["--steps", "3", "--log-every", HUGE], capsys)
    assert status == 0 and re.findall(r"^step\s+(\d)/3", out, re.M) == ["1", "3"], out
    saved = tmp_path / "gpt.npz"
    status, out, _ = outcome(train_gpt, ["--steps", "2", "--save-every", "5", "--save", str(saved)], capsys)
    assert status == 0 and saved.is_file() and out.count(f"saved {saved}") == 1, out
    status, out, _ = outcome(train_gpt, ["--bucket-mb", "inf"], capsys)
    assert status == 0, out
    # a text too short to hold out a window trains without evaluating, when asked; --warmup 0 and --lr-min
    # equal to --lr: a constant lr; --warmup --steps - 1: the last step at --lr
    status, out, _ = outcome(train_gpt, ["--text", str(tmp_path / "five.txt"), "--seq", "40", "--eval-every", "0"],
                             capsys) if (tmp_path / "five.txt").write_text("abcde" * 40) else (None,) * 3
    assert status == 0 and "held-out loss" not in out, out
    status, out, _ = outcome(train_gpt, ["--steps", "3", "--log-every", "1", "--warmup", "0", "--lr-min", "3e-3"],
                             capsys)
    assert status == 0 and re.findall(r"lr (\S+)  ", out) == ["3.00e-03"] * 3, out
    status, out, _ = outcome(train_gpt, ["--steps", "3", "--log-every", "1", "--warmup", "2"], capsys)
    assert status == 0 and re.findall(r"lr (\S+)  ", out) == ["1.50e-03", "3.00e-03", "3.00e-03"], out
    status, out, _ = outcome(train_gpt, ["--steps", "3", "--trace", str(tmp_path / "t.json"), "--trace-steps", HUGE],
                             capsys)
    assert status == 0 and "traced steps 2..3 into" in out and "trained steps 1..3" in out, out


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_run_that_diverges_stops_at_the_first_non_finite_loss_with_one_error_line(train_gpt, tmp_path, capsys):
    """--lr 1e30 is finite and positive, and the first step is fine; before, every later step printed
    loss nan, and --save saved the NaN weights. Now the run stops there, status 2, and saves nothing."""
    saved = tmp_path / "gpt.npz"
    status, out, err = outcome(train_gpt, ["--lr", "1e30", "--weight-decay", "0", "--steps", "4", "--save",
                                           str(saved)], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1, err
    assert "at step 2: the training diverged (its weights are not saved)" in errors[0], err
    assert "step    1/4" in out and "step    2/4" not in out and not saved.exists(), out


def test_a_batch_too_big_for_memory_is_one_error_line(train_gpt, capsys):
    """numpy refuses the allocation at once (no swapping): one line saying what to make smaller."""
    status, out, err = outcome(train_gpt, ["--batch", IMPOSSIBLE], capsys)
    assert_refused(status, out, err, "out of memory: Unable to allocate")


# -- the steps trained: exactly [first step, --steps), each once ----------------------------------------


@pytest.mark.parametrize("first_step, steps, trace_steps", [(0, 4, 3), (0, 4, -1), (0, 4, 0), (0, 1, 3), (0, 2, 9),
                                                           (3, 4, 2), (3, 5, -2), (2, 2, 1)])
def test_the_trace_window_never_repeats_or_skips_a_step(train_gpt, tmp_path, first_step, steps, trace_steps, capsys):
    """Before: --trace-steps -1 made the window [2, 0): step 1 trained twice, 5 updates for --steps 4."""
    args = train_gpt.parse(TINY + ["--steps", str(steps), "--trace", str(tmp_path / "t.json")])
    args.trace_steps = trace_steps  # what validate() refuses: train() itself must hold anyway
    mesh = comm.init()
    training = train_gpt.setup(argparse.Namespace(**{**vars(args), "trace": None}), mesh)
    trained = []
    train_gpt.train(training.model, training.optimizer, training.gradients, training.data, args, mesh, first_step,
                    report=lambda step, *_: trained.append(step))
    assert trained == list(range(first_step, steps))


def test_trace_steps_must_be_positive(train_gpt, tmp_path, capsys):
    """Before: `--trace-steps -1 --steps 4` printed 'traced steps 2..0' and made 5 updates; 0 wrote an empty trace."""
    for value in ("-1", "0"):
        status, out, err = outcome(train_gpt, ["--steps", "4", "--trace", str(tmp_path / "t.json"),
                                               "--trace-steps", value], capsys)
        assert_refused(status, out, err, f"--trace-steps must be a positive integer, not {value}")


def test_resuming_at_steps_trains_nothing_and_says_so(train_gpt, tmp_path, capsys):
    """Before: a checkpoint of step 2 loaded with --steps 2 --trace printed 'trained steps 3..2', trained
    one step anyway and saved it labelled step 2; without --trace it trained nothing and said nothing."""
    saved, again = tmp_path / "a.npz", tmp_path / "b.npz"
    assert outcome(train_gpt, ["--steps", "2", "--save", str(saved)], capsys)[0] == 0
    for trace in ([], ["--trace", str(tmp_path / "t.json")]):
        status, out, err = outcome(train_gpt, ["--steps", "2", "--load", str(saved), "--save", str(again), *trace],
                                   capsys)
        assert_refused(status, out, err, f"the checkpoint {saved} is at step 2 and --steps is 2: nothing to train; "
                                         f"pass --steps larger than 2")
        assert not again.exists()


def test_a_vocabulary_that_tp_does_not_divide_names_the_tp_that_do(train_gpt, files):
    """The text decides the vocabulary: 5 characters, padded to 8, allow tp 1, 2, 4, 8 (a mesh of tp 3 is
    faked: the check comes before any collective)."""
    args = train_gpt.parse(TINY + ["--text", files.five])
    world = types.SimpleNamespace(comm=MPI.COMM_WORLD)
    mesh = types.SimpleNamespace(dp_size=1, tp_size=3, pp_size=1, cp_size=1, world=world)
    with pytest.raises(ValueError) as refused:
        train_gpt.setup(args, mesh)
    assert str(refused.value) == ("the vocabulary of this text is 5 characters, padded to 8: --tp must divide it "
                                  "(the embedding and the LM head are split by vocabulary), tp ∈ {1, 2, 4, 8}, not 3")


# -- checked mode: on by default, off with --unchecked -------------------------------------------------


@pytest.mark.parametrize("unchecked", [False, True])
def test_checked_mode_is_on_unless_unchecked(train_gpt, monkeypatch, unchecked, capsys):
    """Before: train_gpt.py ran unchecked unless --check or MINITP_CHECKED=1 (which the tests set)."""
    monkeypatch.setattr(checks, "_checked", [unchecked])  # the opposite of what the run must leave; restored after
    status, _, err = outcome(train_gpt, ["--unchecked"] if unchecked else [], capsys)
    assert status == 0 and comm.checked() is not unchecked, err


def test_unchecked_says_what_it_skips_and_what_it_costs(train_gpt, capsys):
    status, out, _ = outcome(train_gpt, ["--help"], capsys)
    helped = " ".join(out[out.index("--unchecked "):].split())
    assert status == 0 and "shape and dtype" in helped and re.search(r"\d+ ?%", helped), helped


# -- the text: frozen, so that the README's figures stay true -----------------------------------------

CORPUS = ROOT / "tutorials" / "data" / "corpus.txt"
CORPUS_SHA = "eab346757edd66e4"


def test_the_default_text_is_the_frozen_corpus_not_the_readme(train_gpt):
    """Before: the text was README.md + tutorials/*.py, so every edit of the README changed the losses it
    quotes. The frozen file must not change either: its fingerprint is pinned here."""
    text = train_gpt.read_corpus()
    assert text == CORPUS.read_text(encoding="utf-8") and train_gpt.corpus_hash(text) == CORPUS_SHA


def test_the_first_loss_the_readme_quotes_is_what_the_default_model_computes(train_gpt, capsys):
    """The README's cluster run quotes its first step's loss; the same model on one rank computes the same
    loss, up to float32 rounding (the mesh changes only the order of sums)."""
    quoted = re.search(r"trained steps 1\.\.\d+ in [\d.]+ s:\s+loss (\d\.\d{4}) \(first\s+step\)",
                       (ROOT / "README.md").read_text(encoding="utf-8"))
    assert quoted, "the README quotes a run"
    status = train_gpt.main(["--steps", "1", "--sample", "0"])
    out = capsys.readouterr().out
    first = float(re.search(r"loss (\d\.\d+) \(first step\)", out).group(1))
    assert status == 0 and abs(first - float(quoted.group(1))) <= 2e-4, (quoted.group(0), out)


# -- the README's advice for a rank that raises before it imports minitp --------------------------------

RAISES_BEFORE_MINITP = """\
from mpi4py import MPI
if MPI.COMM_WORLD.Get_rank() == 1:
    raise RuntimeError("rank 1 fails before importing minitp")
MPI.COMM_WORLD.Barrier()  # rank 0 waits here for a rank that is gone: without mpi4py's runner, forever
import minitp
print("unreachable")
"""


@needs_mpiexec
def test_python_m_mpi4py_ends_a_job_whose_rank_raises_before_importing_minitp(tmp_path):
    """minitp's abort-on-exception handler is installed when minitp is imported; before that, a rank that
    raises leaves the others waiting. The README's advice: run the script with `python -m mpi4py`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mpiexec -n 4 python -m mpi4py script.py" in readme
    script = tmp_path / "script.py"
    script.write_text(RAISES_BEFORE_MINITP)
    done = subprocess.run(launcher.command(2) + [sys.executable, "-m", "mpi4py", str(script)], capture_output=True,
                          text=True, timeout=60, env=launcher.environment({}), cwd=ROOT)
    assert done.returncode != 0 and "rank 1 fails before importing minitp" in done.stderr, done.stderr
    assert "unreachable" not in done.stdout
