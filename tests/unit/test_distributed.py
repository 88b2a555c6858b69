"""How an optimizer step is shared between processes, and which settings are refused."""

import pytest

from tunelab.errors import ConfigError
from tunelab.train.distributed import World, choose_distributed


def shares(step, size):
    return [World(rank=r, size=size).mine(step) for r in range(size)]


def test_micro_batches_go_round_robin_and_rows_split_when_there_are_fewer():
    step = [[0, 1], [2, 3], [4, 5]]
    assert shares(step, 2) == [[[0, 1], [4, 5]], [[2, 3]]]
    assert shares([[0, 1, 2]], 2) == [[[0, 2]], [[1]]]
    assert shares([[7]], 2) == [[[7]], []]  # rank 1 adds zeros this step
    assert World().mine(step) == step
    for size in (2, 3, 4):  # every sequence of the step once, on some rank
        got = sorted(i for share in shares(step, size) for rows in share for i in rows)
        assert got == list(range(6))


def test_the_choice_and_the_refusals():
    one, two = World(), World(rank=0, size=2, local_size=2)
    assert choose_distributed("auto", one, trains_base=False) == ("none", "")
    assert choose_distributed("auto", two, trains_base=False)[0] == "ddp"
    assert "2 processes" in choose_distributed("ddp", two, trains_base=True)[1]
    with pytest.raises(ConfigError, match="train.distributed: 'none' but torchrun started 2"):
        choose_distributed("none", two, trains_base=False)
    with pytest.raises(ConfigError, match="'fsdp'.*not available yet"):
        choose_distributed("fsdp", one, trains_base=True)
