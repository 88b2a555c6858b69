"""The training loop on a tiny random model: RELIABILITY 10, 12-18, reproducibility, run folder."""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.runs import Interrupted, config, final_weights, halt_after, losses, quiet
from tunelab.cli import main
from tunelab.config.load import load_config
from tunelab.testing import tiny_model_dir
from tunelab.train.guards import TrainingStopped
from tunelab.train.plan import ResumeError
from tunelab.workflow.finetune import finetune as run_training

METHODS = ["full", "freeze", "lora"]


# -- the run folder ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_run_folder_is_complete(tmp_path, model_dir, data_file, method):
    run = run_training(config(tmp_path, model_dir, data_file, f"method.name={method}"), log=quiet)
    names = {p.name for p in run.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "checkpoints",
        "final",
        "train_loss.png",
        "summary.md",
    } <= names
    assert (run / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    final = {p.name for p in (run / "final").iterdir()}
    assert ("adapter_config.json" in final) == (method == "lora")
    assert "tokenizer_config.json" in final
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert any("eval_loss" in r for r in records)
    assert records[0]["step"] == 0 and "eval_loss" in records[0]  # the untrained model, first
    assert all(k in records[1] for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    assert "best" in (run / "summary.md").read_text().lower()


# -- 10: frozen is frozen ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["freeze", "lora"])
def test_frozen_weights_are_bit_identical(tmp_path, model_dir, data_file, method):
    before = load_file(model_dir / "model.safetensors")
    run = run_training(
        config(tmp_path, model_dir, data_file, f"method.name={method}", "method.trainable_layers=1",
               "train.weight_decay=0.1"),
        log=quiet,
    )  # fmt: skip
    if method == "lora":
        adapter = load_file(run / "final" / "adapter_model.safetensors")
        assert adapter and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in adapter)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft = PeftModel.from_pretrained(base, run / "final")
        frozen = {
            n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in peft.named_parameters() if "lora_" not in n
        }  # fmt: skip
    else:
        frozen = load_file(run / "final" / "model.safetensors")
    changed = []
    for name, tensor in before.items():
        if name not in frozen:
            continue
        same = torch.equal(frozen[name], tensor)
        trained = method == "freeze" and ".layers.1." in name
        assert same != trained, name
        changed += [name] if not same else []
    assert changed or method == "lora"


# -- 12: overfit sanity ------------------------------------------------------------------------
@pytest.mark.parametrize("method, lr", [("full", 5e-3), ("freeze", 5e-3), ("lora", 1e-2)])
def test_memorises_four_examples(tmp_path, model_dir, data_file, method, lr):
    small = tmp_path / "four.jsonl"
    small.write_text("\n".join(data_file.read_text().splitlines()[:4]))
    cfg = config(
        tmp_path, model_dir, small, f"method.name={method}", f"train.lr={lr}", "data.val_ratio=0",
        "train.max_steps=100", "train.micro_batch_size=4", "train.grad_accum=1", "train.save_steps=100",
        "train.warmup_ratio=0", "train.schedule=constant", "data.prompt_loss_weight=0", "method.r=16",
        "method.trainable_layers=2", "method.trainable_modules=[lm_head]",
    )  # fmt: skip
    if (
        method == "lora"
    ):  # a random tiny model's tied head is too weak to fit through the body alone
        cfg = cfg.model_copy(
            update={
                "method": cfg.method.model_copy(update={"targets": ["q_proj", "v_proj", "lm_head"]})
            }
        )
    run = run_training(cfg, log=quiet)
    history = losses(run)
    assert history[0]["loss"] > 2.0
    assert history[-1]["loss"] < 0.05, history[-1]


# -- reproducibility and 13: exact resume ------------------------------------------------------
def test_same_seed_same_losses(tmp_path, model_dir, data_file):
    a = run_training(config(tmp_path / "a", model_dir, data_file), log=quiet)
    b = run_training(config(tmp_path / "b", model_dir, data_file), log=quiet)
    assert [r["loss"] for r in losses(a)] == [r["loss"] for r in losses(b)]


RESUME_CASES = [  # (method, extra settings, stop after step, checkpoint resumed from)
    *[(m, (), halt, halt) for m in METHODS for halt in (2, 3)],  # 3 steps/epoch: mid, boundary
    ("lora", ("method.dropout=0.3",), 2, 2),  # dropout: a missing RNG restore changes the result
    ("full", ("train.save_steps=2",), 3, 2),  # stopped between checkpoints, mid-step 4
]


@pytest.mark.parametrize("method, settings, halt, resumed_from", RESUME_CASES)
def test_exact_resume(tmp_path, model_dir, data_file, method, settings, halt, resumed_from):
    extra = (f"method.name={method}", "train.max_steps=7", "train.warmup_steps=2", *settings)
    full = run_training(config(tmp_path / "full", model_dir, data_file, *extra), log=quiet)
    cfg = config(tmp_path / "cut", model_dir, data_file, *extra)
    with pytest.raises(Interrupted):
        run_training(cfg, log=quiet, progress=halt_after(halt))
    cut = tmp_path / "cut" / "run"
    seen = []
    resumed = run_training(load_config(cut / "config.yaml"), resume=cut, log=quiet,
                           progress=halt_after(99, seen))  # fmt: skip
    assert seen == list(range(resumed_from + 1, 8))  # the resumed process ran only these steps
    result = json.loads((resumed / "result.json").read_text())
    assert result["resumed_from"] == resumed_from and result["steps_run"] == 7 - resumed_from
    a, b = losses(full), losses(resumed)
    assert [(r["step"], r["loss"], r["lr"], r["order"]) for r in a] == [
        (r["step"], r["loss"], r["lr"], r["order"]) for r in b
    ]
    wa = final_weights(full)
    wb = final_weights(resumed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(full / "checkpoints" / "step-000007" / "optimizer.pt", weights_only=False)[
        "state"
    ]
    sb = torch.load(resumed / "checkpoints" / "step-000007" / "optimizer.pt", weights_only=False)[
        "state"
    ]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


# -- 15: killed process ------------------------------------------------------------------------
def test_sigkill_then_resume_gives_the_samefinal_weights(tmp_path, model_dir, data_file):
    args = [f"model.name={model_dir}", f"data.path={data_file}", "data.val_ratio=0.25", "train.max_steps=30",
            "train.micro_batch_size=2", "train.save_steps=2", "method.r=4", "name=run"]  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "tunelab",
        "train",
        "-q",
        f"train.output_dir={tmp_path / 'killed'}",
        *args,
    ]
    killed = tmp_path / "killed" / "run"
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # kill it from outside once it is a few steps in, wherever it is then
        deadline = time.monotonic() + 120
        while _last_step(killed) < 3 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        child.kill()
    finally:
        child.wait()
    assert child.returncode == -9, child.stderr.read().decode()
    assert not (killed / "final").exists()
    last = int((killed / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    r = subprocess.run([sys.executable, "-m", "tunelab", "train", "-q", "--resume", str(killed)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads((killed / "result.json").read_text())  # a resume, not a rerun
    assert result["resumed_from"] == last > 0 and result["steps_run"] == 30 - last
    whole = run_training(
        load_config(None, [*args, f"train.output_dir={tmp_path / 'whole'}"]), log=quiet
    )
    wa, wb = final_weights(whole), final_weights(killed)
    assert wa and all(torch.equal(wa[k], wb[k]) for k in wa)


def _last_step(run):
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(x)["step"] for x in lines[:-1] if x.strip()), default=0)


# -- 14: crash during save ---------------------------------------------------------------------
def test_crash_during_save_keeps_the_previous_checkpoint(
    tmp_path, model_dir, data_file, monkeypatch
):
    import tunelab.train.loop as loop

    real = loop.save_state

    def failing(folder, **kw):
        if kw["trainer_state"]["step"] == 3:
            (folder / "optimizer.pt").write_bytes(b"half")
            raise OSError("disk full")
        real(folder, **kw)

    monkeypatch.setattr(loop, "save_state", failing)
    cfg = config(tmp_path, model_dir, data_file)
    with pytest.raises(OSError, match="disk full"):
        run_training(cfg, log=quiet)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not list((run / "checkpoints").glob(".tmp*"))
    monkeypatch.setattr(loop, "save_state", real)
    resumed = run_training(load_config(run / "config.yaml"), resume=run, log=quiet)
    assert [r["step"] for r in losses(resumed)] == list(range(1, 7))


# -- 16: mismatched resume ---------------------------------------------------------------------
def test_mismatched_resume_fails_loudly(tmp_path, model_dir, data_file):
    cfg = config(tmp_path, model_dir, data_file)
    with pytest.raises(Interrupted):
        run_training(cfg, log=quiet, progress=halt_after(2))
    run = tmp_path / "run"
    with pytest.raises(ResumeError, match="train.lr"):
        run_training(load_config(run / "config.yaml", ["train.lr=5e-4"]), resume=run, log=quiet)
    with pytest.raises(ResumeError, match="method.r"):
        run_training(load_config(run / "config.yaml", ["method.r=8"]), resume=run, log=quiet)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(data_file.read_text().replace("boxes", "crates"))
    with pytest.raises(ResumeError, match="data.path"):
        run_training(
            load_config(run / "config.yaml", [f"data.path={other_data}"]), resume=run, log=quiet
        )
    other_model = tiny_model_dir(tmp_path / "m2", seed=1)
    with pytest.raises(ResumeError, match="model"):
        run_training(
            load_config(run / "config.yaml", [f"model.name={other_model}"]), resume=run, log=quiet
        )
    # extending a run is allowed
    resumed = run_training(
        load_config(run / "config.yaml", ["train.max_steps=7"]), resume=run, log=quiet
    )
    assert losses(resumed)[-1]["step"] == 7


def test_resume_of_a_folder_that_is_no_run_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", str(empty)]) == 2
    assert "not a tunelab run folder" in capsys.readouterr().err


# -- 17: NaN guard -----------------------------------------------------------------------------
def _nan_at(monkeypatch, step_to_poison):
    from tunelab.train.objectives import sft as loss_mod

    real = loss_mod.SFT.loss_sum
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        out = real(self, model, batch)
        return out * float("nan") if calls["n"] == step_to_poison else out

    monkeypatch.setattr(loss_mod.SFT, "loss_sum", poisoned)


def test_nan_loss_is_skipped_and_logged(tmp_path, model_dir, data_file, monkeypatch):
    _nan_at(monkeypatch, 3)  # the 3rd micro-batch forward = step 2 (GA 2)
    cfg = config(
        tmp_path, model_dir, data_file, "train.nan_action=skip", "train.eval_at_start=false"
    )
    run = run_training(cfg, log=quiet)
    history = losses(run)
    assert [r.get("nan_skipped", False) for r in history] == [
        False,
        True,
        False,
        False,
        False,
        False,
    ]
    assert all(torch.isfinite(t).all() for t in final_weights(run).values())
    assert "nan" in (run / "summary.md").read_text().lower()


def test_nan_loss_stops_when_configured(tmp_path, model_dir, data_file, monkeypatch):
    _nan_at(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="non-finite loss"):
        cfg = config(
            tmp_path, model_dir, data_file, "train.nan_action=stop", "train.eval_at_start=false"
        )
        run_training(cfg, log=quiet)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-000001"


def test_huge_lr_keeps_parameters_finite(tmp_path, model_dir, data_file):
    run = run_training(config(tmp_path, model_dir, data_file, "train.lr=1e9", "method.name=full",
                              "train.max_nan_skips=10"), log=quiet)  # fmt: skip
    assert any(r.get("nan_skipped") for r in losses(run))
    assert all(torch.isfinite(t).all() for t in final_weights(run).values())


# -- 18: out of memory -------------------------------------------------------------------------
def test_out_of_memory_gives_advice(tmp_path, model_dir, data_file, monkeypatch, capsys):
    from tunelab.train.objectives import sft as loss_mod

    def oom(self, model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loss_mod.SFT, "loss_sum", oom)
    code = main(["train", "-q", *[f"{a}" for a in _args(tmp_path, model_dir, data_file)]])
    err = capsys.readouterr().err
    assert (
        code == 2
        and "out of memory" in err
        and "micro_batch_size=1" in err
        and "Traceback" not in err
    )


def _args(tmp_path, model_dir, data_file):
    return [f"model.name={model_dir}", f"data.path={data_file}", f"train.output_dir={tmp_path}",
            "train.micro_batch_size=2", "train.max_steps=2"]  # fmt: skip


# -- bad configs fail before any work ----------------------------------------------------------
@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.name=prefix", "method.name: 'prefix' is not allowed"),
        ("method.r=0", "method.r: input should be greater than 0"),
        ("train.lr=0", "train.lr: input should be greater than 0"),
        ("train.lr=-1e-4", "train.lr: input should be greater than 0"),
        ("model.precision=fp16", "'fp16' needs a CUDA GPU"),
        ("method.name=qlora", "'qlora' needs a CUDA GPU"),
        ("model.device=cuda", "this machine has no CUDA GPU"),
        ("model.name=./no/such/model", "no/such/model"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, model_dir, data_file, capsys, override, expected):
    if torch.cuda.is_available() and "CUDA" in expected:
        pytest.skip("this machine has CUDA")
    code = main(["train", "-q", *_args(tmp_path / "out", model_dir, data_file), override])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_corrupt_weights_file(tmp_path, data_file, capsys):
    bad = tiny_model_dir(tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x00\x01garbage")
    code = main(["train", "-q", *_args(tmp_path / "out", bad, data_file)])
    err = capsys.readouterr().err
    assert code == 2 and "model.safetensors" in err and "Traceback" not in err


def test_bad_data_fails_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    code = main(
        [
            "train",
            "-q",
            f"data.path={bad}",
            "model.name=./does/not/matter",
            f"train.output_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:1: output: missing" in err


def test_too_few_examples_for_a_batch(tmp_path, model_dir, data_file, capsys, no_weights_read):
    """Refused while planning: no weight is read first."""
    code = main(
        ["train", "-q", *_args(tmp_path, model_dir, data_file), "train.micro_batch_size=64"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "fewer than one micro-batch" in err
