"""Replay (data.replay): each step's share of the replay pool, drawn deterministically; the
settings refused before anything loads; self-rehearsal's prompts apart from the forgetting check."""

import json
import re
from pathlib import Path

import pytest

from tunelab.config.load import load_config
from tunelab.errors import ConfigError
from tunelab.train.batches import StepPlan
from tunelab.train.replay import attach, pool_prompts, rehearsal_prompts, replay_per_step

GOLDEN_FIRST_STEP = [[35, 26, 17, 8], [7, 25, 16, 34]]  # seed 3, before replay existed


class Seq:
    def __init__(self, n):
        self.seq = [0] * n


def planned(task=40, pool=7, k=2, mbs=4, ga=2):
    steps = StepPlan([5 + i % 9 for i in range(task)], micro_batch_size=mbs, grad_accum=ga,
                     seed=3, replay_per_step=k)  # fmt: skip
    train = [Seq(5 + i % 9) for i in range(task)]
    attach(train, steps, [Seq(20 + i) for i in range(pool)])
    return steps, train


def test_every_step_holds_its_replay_share_and_an_epoch_is_a_pass_over_the_task():
    steps, train = planned()
    assert (steps.task_per_step, steps.steps_per_epoch, len(train)) == (6, 7, 47)
    drawn = []
    for epoch in (0, 1):
        task_seen = []
        for step in steps.epoch(epoch):
            flat = [i for mb in step for i in mb]
            assert [len(mb) for mb in step][:-1] == [4] * (len(step) - 1)
            replay = [i for i in flat if i >= 40]
            assert len(replay) == 2  # the share, every step (the last of an epoch too)
            task_seen += [i for i in flat if i < 40]
            drawn += replay
        assert sorted(task_seen) == list(range(40))  # each task example once an epoch
    # the pool is used up before any of it comes again, in a new order each time
    assert sorted(drawn[:7]) == sorted(drawn[7:14]) == list(range(40, 47))
    assert drawn[:7] != drawn[7:14]


def test_the_replay_draw_is_a_pure_function_of_seed_and_step():
    a, _ = planned()
    b, _ = planned()
    assert a.step(9) == b.step(9) == (1, a.epoch(1)[2])
    assert a.replayed(12) == b.replayed(12)
    assert planned(k=3)[0].replayed(0) != a.replayed(0)


def test_without_replay_the_step_plan_is_unchanged():
    lengths = [5 + i % 9 for i in range(40)]
    plain = StepPlan(lengths, micro_batch_size=4, grad_accum=2, seed=3)
    # golden: the first step of seed 3 (pinned: the order of runs without replay must not move)
    assert plain.epoch(0)[0] == GOLDEN_FIRST_STEP


def config(*extra):
    return load_config(None, ["model.name=x", "data.path=x.jsonl", "train.micro_batch_size=4",
                              "train.grad_accum=2", *extra])  # fmt: skip


def test_the_share_is_whole_sequences_and_a_share_of_none_is_refused():
    assert replay_per_step(config()) == 0
    assert replay_per_step(config("data.replay=self")) == 2  # 0.25 of 8
    assert replay_per_step(config("data.replay=self", "data.replay_ratio=0.9")) == 7
    with pytest.raises(
        ConfigError, match="data.replay_ratio: 0.05 of the 8 sequences.*rounds to none"
    ):
        replay_per_step(config("data.replay=self", "data.replay_ratio=0.05"))


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_a_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ConfigError, match="data.replay_ratio"):
        config("data.replay=self", f"data.replay_ratio={ratio}")


def normalised(text):
    return re.sub(r"[^a-z0-9 ]", "", re.sub(r"\s+", " ", text.lower())).strip()


def test_self_rehearsal_prompts_share_nothing_with_the_forgetting_check():
    """Rehearsing the test questions would make the forgetting check meaningless."""
    general = Path(__file__).parents[2] / "examples" / "general" / "general.jsonl"
    questions = [json.loads(x)["messages"][0]["content"] for x in general.read_text().splitlines()]
    asked = {normalised(q) for q in questions}
    # the question without its "Answer with ..." instruction, inside any prompt
    cores = {normalised(q.split("?")[0]) for q in questions}
    prompts = pool_prompts()
    assert len(prompts) >= 300 and len({normalised(p) for p in prompts}) == len(prompts)
    for prompt in prompts:
        assert normalised(prompt) not in asked, prompt
        assert not any(core in normalised(prompt) for core in cores), prompt
    assert rehearsal_prompts(42, 5) == rehearsal_prompts(42, 5) != rehearsal_prompts(1, 5)
    assert set(rehearsal_prompts(42, 5)) < set(prompts)


def test_a_forgetting_drop_gets_the_studys_remedy_and_an_interval(tmp_path):
    from tunelab.workflow.finetune import forgetting_advice, forgetting_interval

    cfg = config()
    assert "data.replay=self" in forgetting_advice(cfg, -0.161)[0]
    assert "16.1 points" in forgetting_advice(cfg, -0.161)[0]
    assert forgetting_advice(cfg, -0.04) == []
    assert forgetting_advice(config("data.replay=self"), -0.2) == []
    for name, scores in (("general-before", [1.0] * 40), ("general-after", [1.0, 0.0] * 20)):
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        rows = [{"index": i, "scores": {"contains": s}} for i, s in enumerate(scores)]
        (folder / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text = forgetting_interval(tmp_path)
    lo, hi = (float(x) for x in re.findall(r"[+-]\d\.\d+", text))
    assert text.startswith(", 95 % CI ") and -0.7 < lo < -0.5 < hi < -0.3  # a 0.5 drop
