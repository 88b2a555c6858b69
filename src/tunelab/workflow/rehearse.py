"""Self-rehearsal (``data.replay: self``): the base model answers general prompts before the
first step, and its answers become the replay pool (train/replay.py; docs/forgetting.md).

Generated once — each rank a share under several processes, every rank gets all — and kept in
the run folder's ``rehearsal.jsonl`` (chat records: prompt, base answer), written before the
first checkpoint, so a resumed run reads it instead of generating again with a model that has
trained since.
"""

from __future__ import annotations

from tunelab.evaluate.generate import GenerationOptions
from tunelab.evaluate.run import Target, generate_shared
from tunelab.files import atomic_write_text, jsonl_text
from tunelab.train.distributed import World
from tunelab.train.guards import TrainingStopped
from tunelab.train.replay import REHEARSAL_FILE, attach, read_pool

#: New tokens of a base answer: the prompts ask for a few sentences at most.
MAX_NEW_TOKENS = 160


def rehearse(run, log=print) -> None:
    """Attach self-rehearsal's pool to ``run``'s plan (nothing to do for other replays)."""
    plan = run.plan
    world = plan.world
    if not plan.rehearsal:
        return
    path = plan.run_dir / REHEARSAL_FILE
    if not path.is_file():
        if not plan.fresh:  # the model in memory has trained: its answers are not the base's
            raise TrainingStopped(f"{path}: missing — the base model's answers are written "
                                  "before the first step; this run folder lost them")  # fmt: skip
        rows = _answers(run, world, log)
        if world.main:
            atomic_write_text(path, jsonl_text(rows))
        world.wait()  # written before any rank reads it
    attach(plan.train, plan.steps, read_pool(path, plan.cfg, plan.tokenizer, chat=True))


def _answers(run, world: World, log) -> list[dict]:
    plan, cfg = run.plan, run.plan.cfg
    system = (
        [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    )
    conversations = [[*system, {"role": "user", "content": p}] for p in plan.rehearsal]
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS, batch_size=cfg.eval.batch_size)
    log(f"self-rehearsal: the base model answers {len(conversations)} general prompts "
        f"(once; kept in {REHEARSAL_FILE})")  # fmt: skip
    target = Target(run.model, plan.tokenizer, f"{cfg.model.name} (before)")
    with run.uncompiled():
        answers = generate_shared(target, conversations, options, spread=world, everywhere=True)
    run.model.train()
    rows = [{"messages": [*c, {"role": "assistant", "content": a.strip()}]}
            for c, a in zip(conversations, answers, strict=True) if a.strip()]  # fmt: skip
    if len(rows) < len(conversations):
        log(f"self-rehearsal: {len(conversations) - len(rows)} empty answers left out")
    return rows
