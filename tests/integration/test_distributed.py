"""Several processes (torchrun, gloo on this CPU) train the very run one process trains: the
same losses at every step and the same weights, an exact resume after a rank dies — on two
processes or on one."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.integration.runs import final_weights, quiet
from tunelab.checkpoint.manager import CheckpointManager, verify
from tunelab.config.load import load_config
from tunelab.workflow.finetune import finetune

KILL = """\
import os
if os.environ.get("RANK") == "1":  # rank 1 dies as a killed process would, before step N + 1
    import tunelab.train.loop as loop
    real, at = loop.optimizer_step, int(os.environ["TUNELAB_TEST_KILL_AT"])

    def dying(run):
        if run.state.step == at:
            import time  # once rank 0 has finished checkpoint N (it writes while this rank runs on)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                latest = run.checkpoints.latest()
                if latest is not None and latest.name.endswith("%06d" % at):
                    break
                time.sleep(0.05)
            os._exit(3)
        return real(run)

    loop.optimizer_step = dying
"""


ECHO = """\
import os
if os.environ.get("TUNELAB_TEST_ECHO"):  # replies that name their prompt; each rank notes its own
    import tunelab.evaluate.run as run

    def echo(model, tokenizer, conversations, options=None, on_progress=None):
        note = os.path.join(os.environ["TUNELAB_TEST_ECHO"], "rank" + os.environ.get("RANK", "0"))
        with open(note, "a") as f:
            f.writelines(c[-1]["content"] + "\\n" for c in conversations)
        return ["echo: " + c[-1]["content"] for c in conversations]

    run.generate = echo
"""


def overrides(tmp_path, model_dir, data_file, name, *extra):
    return [
        f"model.name={model_dir}", f"data.path={data_file}", "data.val_ratio=0.25",
        f"train.output_dir={tmp_path}", f"name={name}", "train.micro_batch_size=2",
        "train.grad_accum=2", "train.max_steps=5", "train.lr=1e-3", "train.eval_steps=2",
        "train.save_steps=1", "train.keep_last=10", "method.r=4", "eval.at_end=false",
        "train.warmup_steps=1", *extra,
    ]  # fmt: skip


def torchrun(nproc, args, env=None, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "tunelab", "train", "-q", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


def one_process(tmp_path, model_dir, data_file, *extra):
    return finetune(load_config(None, overrides(tmp_path, model_dir, data_file, "one", *extra)),
                    log=quiet)  # fmt: skip


def logged(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if "loss" in r],
            [r["eval_loss"] for r in records if "eval_loss" in r])  # fmt: skip


def assert_same_run(ours, reference, weights_atol=1e-6):
    (losses, evals), (ref_losses, ref_evals) = logged(ours), logged(reference)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert evals == pytest.approx(ref_evals, rel=1e-5)
    got, want = final_weights(ours), final_weights(reference)
    assert got.keys() == want.keys() and got
    for key in want:
        assert (got[key] - want[key]).abs().max() <= weights_atol, key


FULL = ["method.name=full", "train.lr=1e-4", "train.max_grad_norm=0.05"]  # clipped: tested


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        pytest.param([], "ddp", id="lora-one-micro-batch-each"),
        pytest.param(["train.grad_accum=3"], "ddp", id="lora-uneven-2-and-1"),
        pytest.param(["train.grad_accum=1"], "ddp", id="lora-rows-of-one-micro-batch-split"),
        pytest.param([*FULL, "train.distributed=ddp"], "ddp", id="full-ddp"),
        pytest.param(FULL, "fsdp", id="full-fsdp"),
        pytest.param(
            [*FULL, "train.grad_accum=3", "data.val_ratio=0.3"],
            "fsdp",
            id="full-fsdp-uneven-steps-and-validation",
        ),  # fmt: skip
    ],
)
def test_two_processes_train_the_one_process_run(tmp_path, model_dir, data_file, extra, kind):
    reference = one_process(tmp_path, model_dir, data_file, *extra)
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "two", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    ours = tmp_path / "two"
    assert_same_run(ours, reference)
    result = json.loads((ours / "result.json").read_text())
    assert (result["world_size"], result["distributed"]) == (2, kind)
    assert f"Processes:** 2, {kind}" in (ours / "summary.md").read_text()
    if kind == "fsdp":  # the checkpoints are sharded: each rank wrote its own shards
        shards = sorted(
            p.name for p in (ours / "checkpoints" / "step-000005" / "sharded").iterdir()
        )
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_fsdp_final_is_the_best_checkpoint_read_back_from_its_shards(
    tmp_path, model_dir, data_file
):
    """train.keep=best under fsdp: final/ holds the best checkpoint's weights — here step 0's
    (saved before the first step, without optimizer state): a learning rate of 1 makes every
    later evaluation worse."""
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "two", *FULL, "train.lr=1.0",
                                 "train.max_steps=3"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (result["keep"], result["final_step"], result["distributed"]) == ("best", 0, "fsdp")
    got, base = final_weights(tmp_path / "two"), final_weights(model_dir.parent, model_dir.name)
    assert got.keys() == base.keys() and got
    assert all(torch.equal(got[k], base[k]) for k in base)


KINDS = {"ddp": [], "fsdp": FULL}  # LoRA (replicated) and full fine-tuning (sharded)


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def killed(tmp_path_factory, model_dir, data_file, kind):
    """A 2-process run whose rank 1 died before step 4 (checkpoints of steps 1-3 written)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL)
    env = {"TUNELAB_TEST_KILL_AT": "3",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    started = time.monotonic()
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "run", *KINDS[kind]), env=env)
    return tmp_path, done, time.monotonic() - started


@pytest.fixture(scope="module")
def whole(tmp_path_factory, model_dir, data_file, kind):
    """The same 2-process run, uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("whole")
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "whole", *KINDS[kind]))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "whole"


def test_a_dead_rank_ends_the_job_and_names_itself(killed, kind):
    tmp_path, done, seconds = killed
    assert done.returncode != 0
    assert seconds < 120  # not the collectives' 600 s timeout: torchrun stops the job
    assert "rank: 1" in done.stderr and "exitcode: 3" in done.stderr, done.stderr[-3000:]
    latest = CheckpointManager(tmp_path / "run").latest()
    assert latest is not None and verify(latest) is None
    assert CheckpointManager.step_of(latest) == 3
    assert (latest / "sharded").is_dir() == (kind == "fsdp")


@pytest.mark.parametrize("nproc", [2, 1])
def test_a_killed_two_process_run_resumes_exactly_on_two_or_one(killed, whole, tmp_path, nproc):
    """FSDP's sharded checkpoint too: on two processes, or into one plain model."""
    source, _, _ = killed
    run = tmp_path / "run"
    shutil.copytree(source / "run", run)
    done = torchrun(nproc, ["--resume", str(run)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, whole)
    assert json.loads((run / "result.json").read_text())["world_size"] == nproc


def test_fsdp_refuses_a_whole_checkpoint_before_loading_weights(tmp_path, model_dir, data_file):
    """A checkpoint of one process (whole weights) cannot go into a sharded model: refused with
    the way out, in a line (tunelab train --nproc), before any weights load."""
    one_process(tmp_path, model_dir, data_file, *FULL, "train.max_steps=1")
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", "-q", "--nproc", "2", "--resume",
         str(tmp_path / "one"), "train.max_steps=2"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "train.distributed=fsdp resumes only sharded checkpoints" in done.stderr
    assert "resume it with train.distributed=ddp" in done.stderr
    assert "error: rank 0 of 2 stopped on the error above" in done.stderr or \
        "error: rank 1 of 2 stopped on the error above" in done.stderr  # fmt: skip
    assert "Traceback" not in done.stderr and "Loading weights" not in done.stderr
    assert CheckpointManager.step_of(CheckpointManager(tmp_path / "one").latest()) == 1


@pytest.mark.parametrize(("extra", "kind"), [([], "ddp"), (["method.name=full"], "fsdp")])
def test_dry_run_with_nproc_shows_the_processes(tmp_path, model_dir, data_file, extra, kind):
    args = overrides(tmp_path, model_dir, data_file, "plan", *extra)
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", "--dry-run", "--nproc", "2", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"distributed: {kind} over 2 processes" in done.stdout
    assert "memory per process: tunelab plan --nproc 2" in done.stdout
    assert not (tmp_path / "plan").exists()


def test_the_evaluation_at_the_end_is_shared_and_gathered(tmp_path, model_dir, data_file):
    """Each rank generates a share of eval.data and of the forgetting check (before, after);
    rank 0 gathers them in order: the same predictions as one process."""
    evals = [f"eval.data={data_file}", f"eval.general_data={data_file}", "eval.at_end=true",
             "eval.max_new_tokens=6", "train.max_steps=2", "eval.batch_size=3"]  # fmt: skip
    reference = one_process(tmp_path, model_dir, data_file, *evals)
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "two", *evals))
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("finetuned", "general-before", "general-after"):
        ours, theirs = (
            [json.loads(x) for x in (run / "eval" / name / "predictions.jsonl").read_text().splitlines()]
            for run in (tmp_path / "two", reference)
        )  # fmt: skip
        assert len(ours) == 16
        assert [r["prediction"] for r in ours] == [r["prediction"] for r in theirs], name
        assert [r["index"] for r in ours] == list(range(16))
    assert "forgetting check" in (tmp_path / "two" / "summary.md").read_text()


def test_each_rank_generates_its_share_and_rank_0_keeps_the_order(tmp_path, model_dir, data_file):
    """With replies that name their prompt: every example is generated once, by one rank, half
    each, and its reply lands at its own index."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(ECHO)
    (tmp_path / "notes").mkdir()
    env = {"TUNELAB_TEST_ECHO": str(tmp_path / "notes"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    evals = [f"eval.data={data_file}", "eval.at_end=true", "train.max_steps=1", "eval.batch_size=3"]
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "two", *evals), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(x) for x in
               (tmp_path / "two" / "eval" / "finetuned" / "predictions.jsonl").read_text().splitlines()]  # fmt: skip
    assert [r["prediction"] for r in records] == [f"echo: {r['prompt']}" for r in records]
    shares = [(tmp_path / "notes" / f"rank{r}").read_text().splitlines() for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(r["prompt"] for r in records)
    assert len(shares[0]) == len(shares[1]) == 8


def test_tunelab_train_nproc_names_the_dead_rank_in_one_line_without_a_traceback(
    tmp_path, model_dir, data_file
):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL)
    env = {**os.environ, "TUNELAB_TEST_KILL_AT": "3",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", "-q", "--nproc", "2",
         *overrides(tmp_path, model_dir, data_file, "run")],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert done.returncode == 3
    assert "error: rank 1 of 2 exited with code 3; the job stopped" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert CheckpointManager.step_of(CheckpointManager(tmp_path / "run").latest()) == 3
