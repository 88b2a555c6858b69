"""Several processes (torchrun, gloo on this CPU) train the very run one process trains: the
same losses at every step and the same weights, an exact resume after a rank dies — on two
processes or on one."""

import json
import os
import subprocess
import sys
import time

import pytest

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
            os._exit(3)
        return real(run)

    loop.optimizer_step = dying
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


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="lora-one-micro-batch-each"),
        pytest.param(["train.grad_accum=3"], id="lora-uneven-2-and-1"),
        pytest.param(["train.grad_accum=1"], id="lora-rows-of-one-micro-batch-split"),
        pytest.param(["method.name=full", "train.lr=1e-4"], id="full"),
    ],
)
def test_two_processes_train_the_one_process_run(tmp_path, model_dir, data_file, extra):
    reference = one_process(tmp_path, model_dir, data_file, *extra)
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "two", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    ours = tmp_path / "two"
    assert_same_run(ours, reference)
    result = json.loads((ours / "result.json").read_text())
    assert (result["world_size"], result["distributed"]) == (2, "ddp")
    assert "Processes:** 2, ddp" in (ours / "summary.md").read_text()


@pytest.fixture(scope="module")
def killed(tmp_path_factory, model_dir, data_file):
    """A 2-process run whose rank 1 died before step 4 (checkpoints of steps 1-3 written)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL)
    env = {"TUNELAB_TEST_KILL_AT": "3",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    started = time.monotonic()
    done = torchrun(2, overrides(tmp_path, model_dir, data_file, "run"), env=env)
    return tmp_path, done, time.monotonic() - started


def test_a_dead_rank_ends_the_job_and_names_itself(killed):
    tmp_path, done, seconds = killed
    assert done.returncode != 0
    assert seconds < 120  # not the collectives' 600 s timeout: torchrun stops the job
    assert "rank: 1" in done.stderr and "exitcode: 3" in done.stderr, done.stderr[-3000:]
    latest = CheckpointManager(tmp_path / "run").latest()
    assert latest is not None and verify(latest) is None
    assert CheckpointManager.step_of(latest) == 3


@pytest.mark.parametrize("nproc", [2, 1])
def test_a_killed_two_process_run_resumes_exactly_on_two_or_one(
    killed, tmp_path, model_dir, data_file, nproc
):
    source, _, _ = killed
    run = tmp_path / "run"
    import shutil

    shutil.copytree(source / "run", run)
    done = torchrun(nproc, ["--resume", str(run)])
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path / "whole"
    whole = torchrun(2, overrides(tmp_path, model_dir, data_file, "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same_run(run, reference)
    assert json.loads((run / "result.json").read_text())["world_size"] == nproc


def test_dry_run_with_nproc_shows_the_processes(tmp_path, model_dir, data_file):
    args = overrides(tmp_path, model_dir, data_file, "plan")
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", "--dry-run", "--nproc", "2", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "distributed: ddp over 2 processes" in done.stdout
    assert not (tmp_path / "plan").exists()
