"""Execute a :class:`~tunelab.train.plan.RunPlan`: load, apply the method, loop, finish.

    run = prepare(plan)        # weights on the device, the method applied, the optimizer;
                               # a resume restores the checkpoint the plan chose
    outcome = train(run)       # the loop (tunelab.train.loop)
    run_dir = finish(run, outcome)   # final/ (best or last), plot, summary.md, result.json,
                                     # doctor.md (the loss curve diagnosed)

The run folder gets the resolved config first (it is resumable from then on) and the final
model, plot and summary last. Evaluation after training is the workflow's (tunelab.workflow).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from tunelab.checkpoint.manager import CheckpointManager
from tunelab.checkpoint.sharded import gather_weights, is_sharded_checkpoint, load_sharded
from tunelab.checkpoint.state import load_state
from tunelab.config.load import dump_config
from tunelab.files import atomic_folder, atomic_write_json, atomic_write_text
from tunelab.models import attention, varlen
from tunelab.models.device import batch_attention, device_name, two_attentions
from tunelab.models.load import load_weights
from tunelab.models.methods import count_parameters
from tunelab.models.nll import split_head
from tunelab.models.norms import fuse_rms_norms
from tunelab.train.distributed import same_parameters, shard
from tunelab.train.doctor import write_doctor
from tunelab.train.guards import TrainingStopped, is_oom, out_of_memory_message
from tunelab.train.loop import TRAINED_FOLDER, Run, train_loop
from tunelab.train.optim import Schedule, build_optimizer
from tunelab.train.plan import RunPlan, describe_reference
from tunelab.train.reference import setup_reference
from tunelab.train.report import MetricsLog, plot_losses, write_summary
from tunelab.train.speed import remember_compiled, remember_rate, use_inductor_cache
from tunelab.train.stages import StagedSchedule
from tunelab.train.state import Outcome, TrainState


def prepare(plan: RunPlan, *, progress=None, log=print) -> Run:
    started = time.perf_counter()
    model = load(plan)
    main = plan.world.main  # several processes: rank 0 alone writes the run folder
    if main:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    if plan.fresh and main:  # first thing in the folder: it is a run folder from now on
        atomic_write_text(plan.run_dir / "config.yaml", dump_config(plan.cfg))
    torch.manual_seed(plan.cfg.train.seed)  # adapters initialise the same way, however loaded
    model = plan.method.apply(model)
    if plan.compile[0]:
        compile_layers(model, log)
    setup_reference(plan, model, log)  # the model before training (before a resume restores)
    if plan.sharded:  # FSDP: from here on each rank holds its shard of every decoder layer
        shard(model, plan.world)
    t = plan.cfg.train
    optimizer = build_optimizer(
        plan.method.optimizer_parameters(model), t, plan.placement.device.type
    )
    fp16 = plan.placement.autocast_dtype == torch.float16
    run = Run(
        plan=plan, model=model, optimizer=optimizer,
        schedule=StagedSchedule(plan.cfg, plan.steps) if plan.cfg.stages else Schedule(t, plan.total_steps),
        scaler=torch.amp.GradScaler("cuda") if fp16 else None, state=TrainState(fingerprint=plan.fingerprint),
        metrics=MetricsLog(plan.run_dir / "metrics.jsonl"), checkpoints=CheckpointManager(plan.run_dir, t.keep_last),
        progress=progress, started=started, log=log,
    )  # fmt: skip
    if plan.fresh and main:  # a run that died before its first checkpoint logged steps nobody keeps
        run.metrics.truncate_after(-1)
    elif not plan.fresh:
        restore(run, log)
    same_parameters([p for g in optimizer.param_groups for p in g["params"]], plan.world)
    announce(run, log)
    return run


def load(plan: RunPlan) -> torch.nn.Module:
    """The model's weights, on the plan's device in the method's dtype."""
    placement = plan.placement
    try:
        model = load_weights(
            plan.cfg.model.name, dtype=placement.weight_dtype(plan.method.trains_base),
            device=str(placement.device), quantize_bits=plan.method.quantize_bits,
        )  # fmt: skip
    except Exception as e:
        if is_oom(e):
            raise TrainingStopped(
                out_of_memory_message(plan.cfg, plan.method, "model load")
            ) from None
        raise
    if plan.attention == varlen.NAME:  # packed rows, each document's attention alone
        varlen.register()
        model.set_attn_implementation(varlen.NAME)
    elif plan.attention != "sdpa" and hasattr(model, "set_attn_implementation"):
        attention.register()  # grouped matmuls on a CPU (models/attention.py)
        model.set_attn_implementation(attention.NAME)
        if two_attentions(plan.attention):
            attention_by_width(model)
    if placement.device.type == "cpu" and not plan.compile[0]:
        fuse_rms_norms(model)  # fewer passes over memory in eager (compile fuses on its own)
    if plan.cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def attention_by_width(model: torch.nn.Module) -> None:
    """Each forward of ``model``'s decoder picks its attention by the batch's width (matmuls for
    short rows on a CPU, SDPA for long ones: :func:`~tunelab.models.device.batch_attention`),
    through the config field every attention layer and the mask builder read."""
    parts = split_head(model)
    if parts is None:
        return
    decoder = parts[0]

    def choose(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        module.config._attn_implementation = batch_attention(ids.shape[1])

    decoder.register_forward_pre_hook(choose, with_kwargs=True)


def compile_layers(model: torch.nn.Module, log=print) -> None:
    """torch.compile each decoder layer in place (regional compilation: the layers share their
    code, so one compilation — with dynamic shapes — serves all of them; parameter names and
    checkpoints are unchanged). When the embeddings are frozen (LoRA) the first layer's input
    needs no gradient, which would take a graph, and a compilation, of its own: that layer
    stays eager (1/layers of the gain, against ~25 s of compiling on a 2-core CPU)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(lm.get_decoder(), "layers", None) if hasattr(lm, "get_decoder") else None
    if not isinstance(layers, torch.nn.ModuleList):
        log("train.compile: this model's decoder layers were not found; running uncompiled")
        return
    trained_input = any(p.requires_grad for p in lm.get_input_embeddings().parameters())
    use_inductor_cache()  # the cache train.compile auto looked in (train/speed.py)
    # Python floats (norm epsilons, LoRA scales) as constants: traced as symbols they made
    # dynamo throw its first trace away and start again (~8 s on a 2-core CPU). They do not
    # change between steps; a change would recompile, not go wrong.
    torch._dynamo.config.specialize_float = True
    for layer in layers[0 if trained_input else 1 :]:
        layer.compile(dynamic=True)


def restore(run: Run, log=print) -> None:
    """Continue from the plan's checkpoint: weights, optimizer, RNG and loop state."""
    checkpoint = run.plan.resume_from
    if is_sharded_checkpoint(checkpoint):  # FSDP's: on this run's processes, sharded or not
        load_sharded(checkpoint, run.model, run.optimizer)
        saved = load_state(checkpoint, optimizer=None, scheduler=None, scaler=run.scaler)
    else:
        run.plan.method.load(run.model, checkpoint / TRAINED_FOLDER)
        saved = load_state(checkpoint, optimizer=run.optimizer, scheduler=None, scaler=run.scaler)
    run.state = TrainState.from_dict(saved, str(checkpoint / "trainer_state.json"))
    run.state.fingerprint = run.plan.fingerprint
    if run.plan.world.main:
        run.metrics.truncate_after(run.state.step)
    log(f"resuming {run.plan.run_dir} from {checkpoint.name} (step {run.state.step} of "
        f"{run.plan.total_steps}; next lr {run.schedule.lr(run.state.step):.3g})")  # fmt: skip


def announce(run: Run, log=print) -> None:
    plan = run.plan
    trainable, total = count_parameters(run.model)
    t = plan.cfg.train
    for note in plan.notes + plan.objective_notes:
        log(note)
    if plan.objective.uses_reference:
        log(f"reference model: {describe_reference(plan)}")
    log(
        f"run folder: {plan.run_dir}\n"
        f"model {plan.cfg.model.name} on {plan.placement.describe()}, {plan.attention} attention"
        + "".join(f", {why}" for _, why in (plan.compile, plan.packing, plan.distributed) if why)
        + ", "
        f"method {plan.method.describe()}: "
        f"{trainable:,} of {total:,} parameters trained\n"
        f"data: {plan.steps.n} train / {len(plan.val)} val examples"
        + (f" ({plan.truncation()})" if plan.truncation() else "")
        + f"; {plan.total_steps} steps of {t.micro_batch_size} x {t.grad_accum}, eval every {plan.eval_steps}"
        + (f"\nreplay: {plan.replay}" if plan.replay else "")
    )


def train(run: Run, log=print) -> Outcome:
    if run.plan.steps.replay_per_step and not run.plan.steps.replay:
        raise ValueError("data.replay: the replay pool was never attached (workflow/rehearse.py)")
    if run.plan.fresh:  # the data order and dropout do not depend on what ran before the loop
        torch.manual_seed(run.plan.cfg.train.seed)
    if run.plan.placement.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    outcome = train_loop(run)
    plan = run.plan
    if plan.compile[0] and outcome.steps_run and plan.compile_key:
        remember_compiled(plan.compile_key)  # the next run of this graph loads it
    per_token = plan.flops_per_token()
    if outcome.step_rate and plan.compile_key and per_token and not plan.world.several:
        remember_rate(plan.compile_key, plan.compile[0], outcome.step_rate * per_token)
    return outcome


def finish(run: Run, outcome: Outcome):
    """Write final/ (the weights ``plan.keep`` names), the plot, summary.md, result.json and
    the diagnosis (doctor.md, doctor.png)."""
    plan = run.plan
    if not plan.world.main and not plan.sharded:  # rank 0 writes the results
        return plan.run_dir
    final_step, note = _final_weights(run)
    whole = gather_weights(run.model) if plan.sharded else None  # FSDP: every rank takes part
    if not plan.world.main:
        return plan.run_dir
    with atomic_folder(plan.run_dir / "final") as tmp:
        plan.method.save(run.model, tmp, state_dict=whole)
        plan.tokenizer.save_pretrained(tmp)
    plot_losses(MetricsLog.read(plan.run_dir / "metrics.jsonl"), plan.run_dir / "train_loss.png")
    info = _result(run, outcome, final_step, note)
    write_summary(plan.run_dir, info)
    atomic_write_json(plan.run_dir / "result.json", info)
    _diagnose(run, info)
    return plan.run_dir


def _diagnose(run: Run, info: dict) -> None:
    """doctor.md and doctor.png. The run is complete by now: a failing diagnosis is told, not
    allowed to fail it."""
    run_dir = run.plan.run_dir
    try:
        write_doctor(run_dir, MetricsLog.read(run_dir / "metrics.jsonl"), info)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the weights are saved
        run.log(
            f"doctor: could not diagnose this run ({type(e).__name__}: {e}); the run itself is complete"
        )


def _final_weights(run: Run) -> tuple[int, str]:
    """Put the weights final/ keeps into the model; (their step, a sentence saying which)."""
    state, plan = run.state, run.plan
    last = f"the last step (step {state.step})"
    if plan.keep != "best":
        return state.step, last
    best = run.checkpoints.best()
    if best is None:
        return state.step, f"{last}: no checkpoint has a validation loss to choose by"
    step = CheckpointManager.step_of(best)
    loss = run.checkpoints.best_metric()
    if step != state.step and is_sharded_checkpoint(best):
        load_sharded(best, run.model)
    elif step != state.step:
        plan.method.load(run.model, best / TRAINED_FOLDER)
    if step == 0:
        return 0, (f"the untrained model (step 0, validation loss {loss:.4f}): no step improved "
                   "on it — try a lower train.lr or fewer epochs")  # fmt: skip
    return step, f"the best checkpoint (step {step}, validation loss {loss:.4f})"


def _result(run: Run, outcome: Outcome, final_step: int, note: str) -> dict:
    plan, state, cfg = run.plan, run.state, run.plan.cfg
    return {
        "name": plan.run_dir.name, "model": cfg.model.name, "method": cfg.method.model_dump(mode="json"),
        "objective": plan.objective.name,
        "train": cfg.train.model_dump(mode="json"), "device": plan.placement.device.type,
        "device_name": device_name(plan.placement.device.type), "world_size": plan.world.size,
        "distributed": plan.distributed[0], "precision": plan.placement.precision, "attention": plan.attention, "compiled": plan.compile[0], "packed": plan.packing[0],
        "train_flops_per_token": plan.flops_per_token(),
        "train_examples": plan.steps.n, "val_examples": len(plan.val), "dropped": plan.dropped,
        "replay": plan.replay or None,
        "truncated": plan.truncated, "truncation": plan.truncation() or None,
        "steps": state.step, "steps_run": outcome.steps_run,
        "resumed_from": None if plan.fresh else CheckpointManager.step_of(plan.resume_from),
        "seconds": round(outcome.seconds, 1),
        "wall_seconds": round(time.perf_counter() - run.started, 1), "tokens": state.tokens,
        "tokens_per_s": round(outcome.tokens / outcome.seconds, 1) if outcome.seconds else None,
        "final_train_loss": outcome.train_loss, "initial_eval_loss": state.initial_eval_loss,
        "best_eval_loss": state.best_eval_loss, "best_step": state.best_step,
        "last_eval_stats": _last_eval_stats(plan.run_dir),
        "nan_skips": state.nan_skips, "stopped_early": outcome.stopped_early,
        "keep": plan.keep, "final_step": final_step, "final": note,
        "output": str(plan.run_dir / "final"), "parameters": count_parameters(run.model)[1],
        **_peak_memory(plan.placement.device),
    }  # fmt: skip


def _last_eval_stats(run_dir) -> dict:
    """The objective's statistics at the last evaluation (rewards, margin, accuracy...)."""
    evals = [r for r in MetricsLog.read(run_dir / "metrics.jsonl") if "eval_loss" in r]
    skip = {"eval_loss", "eval_ppl"}
    return {k.removeprefix("eval_"): v for k, v in evals[-1].items()
            if k.startswith("eval_") and k not in skip} if evals else {}  # fmt: skip


def _peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_gib = rss / (2**30 if sys.platform == "darwin" else 2**20)
    out = {"peak_rss_gib": round(rss_gib, 2)}
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out
