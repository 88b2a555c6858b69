"""The step plan's token budget (train.micro_batch_tokens): each step keeps its sequences, run in
fewer, fuller micro-batches."""

import random

from tunelab.train.batches import StepPlan


def plans(budget):
    lengths = [random.Random(i).randint(5, 60) for i in range(64)]
    lengths[10] = 450  # longer than the budget: a micro-batch of its own
    common = dict(micro_batch_size=4, grad_accum=2, seed=3, group_by_length=False)
    fixed = StepPlan(lengths, **common)
    budgeted = StepPlan(lengths, **common, max_tokens=budget)
    return lengths, fixed, budgeted


def test_a_token_budget_keeps_each_steps_sequences_in_fewer_fuller_micro_batches():
    lengths, fixed, budgeted = plans(400)
    assert budgeted.steps_per_epoch == fixed.steps_per_epoch
    fewer = 0
    for epoch in (0, 1):
        for a, b in zip(fixed.epoch(epoch), budgeted.epoch(epoch), strict=True):
            assert sorted(i for mb in a for i in mb) == sorted(i for mb in b for i in mb)
            flat = [i for mb in b for i in mb]
            assert [lengths[i] for i in flat] == sorted((lengths[i] for i in flat), reverse=True)
            for mb in b:
                width = max(lengths[i] for i in mb)
                assert len(mb) * width <= 400 or len(mb) == 1
            for k, first in enumerate(b[:-1]):  # none could have taken the next one in,
                spared = k == len(b) - 2 and len(b[-1]) == 2  # but the row it gave the last
                assert (len(first) + 1 + spared) * lengths[first[0]] > 400
            assert len(b[-1]) > 1 or len(b) == 1 or len(b[-2]) <= 2  # no last row alone
            fewer += len(b) < len(a)
    assert fewer > 0
    assert [10] in [mb for step in budgeted.epoch(0) for mb in step]  # the long one alone
    assert budgeted.epoch(1) == plans(400)[2].epoch(1)  # a pure function of seed and epoch
    assert budgeted.step(9) == (1, budgeted.epoch(1)[1])


def test_a_last_sequence_left_alone_takes_one_from_the_micro_batch_before():
    """Greedy cuts of 8 sequences under 4 x 100 tokens: 7 fit in one micro-batch, the 8th would
    run alone (a one-row shape, a graph of its own when compiled); it takes the 7th instead.
    Without a budget, and with replay, a step's last row alone takes one the same way."""
    lengths = [57, 57, 56, 56, 55, 55, 54, 40]
    plan = StepPlan(lengths, micro_batch_size=4, grad_accum=2, seed=0, max_tokens=400)
    assert plan.regroup([[0, 1, 2, 3], [4, 5, 6, 7]]) == [[0, 1, 2, 3, 4, 5], [6, 7]]
    two = StepPlan([90, 80, 10], micro_batch_size=2, grad_accum=1, seed=0, max_tokens=180)
    assert two.regroup([[0, 1], [2]]) == [[0, 1], [2]]  # two rows cannot spare one

    fixed = StepPlan([50] * 9, micro_batch_size=4, grad_accum=3, seed=0, group_by_length=False)
    (step,) = fixed.epoch(0)  # no budget: 4 + 4 + 1 rows would leave the last one alone
    assert [len(mb) for mb in step] == [4, 3, 2] and sorted(sum(step, [])) == list(range(9))
    replay = StepPlan([50] * 9, micro_batch_size=4, grad_accum=3, seed=0, replay_per_step=3)
    assert [len(mb) for mb in replay.epoch(0)[0]] == [4, 3, 2]  # 9 task rows, pool not attached


def test_out_of_memory_advice_names_the_token_budget_when_one_is_set():
    from tunelab.config.load import load_config
    from tunelab.models.methods import get_method
    from tunelab.train.guards import out_of_memory_message

    cfg = load_config(None, ["train.micro_batch_tokens=2048"])
    said = out_of_memory_message(cfg, get_method(cfg.method), "step 3")
    assert "train.micro_batch_tokens=1024" in said
    cfg = load_config(None, ["train.micro_batch_tokens=null"])
    assert "micro_batch_tokens" not in out_of_memory_message(cfg, get_method(cfg.method), "step 3")


def test_auto_budgets_the_configs_widest_forward():
    """``auto``: micro_batch_size rows of the longest sequence — no forward wider (in padded
    tokens) than the worst one the fixed micro-batches allow; fewer forwards where lengths vary."""
    from tunelab.train.batches import token_budget

    lengths = [random.Random(i).randint(5, 40) for i in range(64)]
    lengths[10] = 120  # a long tail, as in instruction data
    assert token_budget("auto", 4, lengths) == 4 * max(lengths) == 480
    assert token_budget(512, 4, lengths) == 512 and token_budget(None, 4, lengths) is None
    common = dict(micro_batch_size=4, grad_accum=2, seed=3, group_by_length=False)
    fixed, auto = StepPlan(lengths, **common), StepPlan(lengths, **common, max_tokens="auto")
    assert auto.max_tokens == 480
    forwards = {id(p): sum(len(step) for step in p.epoch(0)) for p in (fixed, auto)}
    assert forwards[id(auto)] < forwards[id(fixed)] == 16
    for step in auto.epoch(0):
        for mb in step:
            assert len(mb) * max(lengths[i] for i in mb) <= 480


def test_auto_budget_in_the_config_and_the_out_of_memory_advice():
    import pytest

    from tunelab.config.load import load_config
    from tunelab.errors import ConfigError
    from tunelab.models.methods import get_method
    from tunelab.train.guards import out_of_memory_message

    cfg = load_config(None, [])
    assert cfg.train.micro_batch_tokens == "auto"  # the default
    said = out_of_memory_message(cfg, get_method(cfg.method), "step 3")
    assert "train.micro_batch_tokens=null" in said
    for bad in ("big", "0", "-5"):
        with pytest.raises(ConfigError, match="micro_batch_tokens"):
            load_config(None, [f"train.micro_batch_tokens={bad}"])
