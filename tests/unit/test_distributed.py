"""How an optimizer step is shared between processes, and which settings are refused."""

import pytest

from tunelab.config.schema import MethodConfig
from tunelab.errors import ConfigError
from tunelab.models.methods import get_method
from tunelab.train.distributed import World, choose_distributed, passes


def method(name):
    return get_method(MethodConfig(name=name))


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
    assert choose_distributed("auto", one, method("lora")) == ("none", "")
    assert choose_distributed("auto", one, method("full")) == ("none", "")
    assert choose_distributed("auto", two, method("lora"))[0] == "ddp"
    assert choose_distributed("auto", two, method("freeze"))[0] == "ddp"
    assert (
        choose_distributed("auto", two, method("full"))[0] == "fsdp"
    )  # full fine-tuning is sharded
    assert choose_distributed("ddp", two, method("full"))[0] == "ddp"
    assert "2 processes" in choose_distributed("fsdp", two, method("full"))[1]
    assert choose_distributed("fsdp", one, method("full"))[0] == "none"
    with pytest.raises(ConfigError, match="train.distributed: 'none' but torchrun started 2"):
        choose_distributed("none", two, method("lora"))
    for name in ("lora", "qlora", "freeze"):
        with pytest.raises(
            ConfigError, match=f"'fsdp' shards full fine-tuning.*method.name={name}"
        ):
            choose_distributed("fsdp", two, method(name))


def test_every_rank_makes_as_many_passes_as_the_busiest():
    for step, size, want in (([[0], [1], [2]], 2, 2), ([[0, 1]], 2, 1), ([[7]], 2, 1),
                             ([[0], [1], [2], [3]], 2, 2), ([[0]] * 5, 3, 2)):  # fmt: skip
        assert passes(step, World(rank=1, size=size)) == want
