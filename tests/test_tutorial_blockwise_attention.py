"""tutorials/blockwise_attention.py runs as a learner runs it and passes its own check: blockwise attention
equals the dense core (output, gradients, dropout) and keeps the bytes its formula says."""
from tutorial_runner import launch


def test_blockwise_attention_tutorial():
    run = launch("blockwise_attention.py", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("check: blockwise attention == dense attention"), run.stdout
    assert "{'BlockwiseAttention': 2129920}" in run.stdout and "10 of 16 block pairs" in run.stdout
