"""Check `tunelab plan`'s memory estimate against torch's own memory tracker on fake tensors.

    python bench/plan_memory.py [--only NAME] [--json OUT]

For each configuration (model shape x method x micro-batch x sequence length x gradient
checkpointing) the model is built from its config inside ``FakeTensorMode`` (nothing is
allocated or read), tunelab's method is applied, and two real training steps of tunelab's own
loss (the chunked LM head), backward and AdamW step run under
``torch.distributed._tools.mem_tracker.MemTracker``. Its peak (parameters, buffers, gradients,
activations, temporaries, optimizer states: every tensor, not the process) is compared with
the estimate's ``tensors`` total (everything but the fixed runtime overhead). An 8B shape runs
in about a minute on 2 CPU cores. QLoRA needs bitsandbytes on CUDA and is not run here.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from tunelab.config.schema import MethodConfig, TrainConfig
from tunelab.models.device import HEAD_CHUNK
from tunelab.models.memory import Activity, estimate_memory
from tunelab.models.methods import get_method
from tunelab.models.nll import chunked_head_nll_sum, split_head
from tunelab.models.shape import model_shape
from tunelab.train.optim import build_optimizer

SHAPES = {  # config.json fields of public models (sizes only; no weights anywhere)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, tie_word_embeddings=True, head_dim=64),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, tie_word_embeddings=False, head_dim=128),
}  # fmt: skip

#: (name, shape, method, micro-batch, sequence length, gradient checkpointing)
CASES = [
    ("135m-full-4x128", "smollm2-135m", "full", 4, 128, False),
    ("135m-full-4x512-ckpt", "smollm2-135m", "full", 4, 512, True),
    ("135m-lora-4x128", "smollm2-135m", "lora", 4, 128, False),
    ("135m-lora-8x512", "smollm2-135m", "lora", 8, 512, False),
    ("135m-lora-8x512-ckpt", "smollm2-135m", "lora", 8, 512, True),
    ("1b-full-2x512", "llama-3.2-1b", "full", 2, 512, False),
    ("1b-lora-4x1024", "llama-3.2-1b", "lora", 4, 1024, False),
    ("1b-lora-4x1024-ckpt", "llama-3.2-1b", "lora", 4, 1024, True),
    ("8b-lora-1x512", "llama-3.1-8b", "lora", 1, 512, False),
    ("8b-lora-2x2048-ckpt", "llama-3.1-8b", "lora", 2, 2048, True),
    ("8b-full-1x1024-ckpt", "llama-3.1-8b", "full", 1, 1024, True),
]


class _NoHook:
    def remove(self) -> None:
        pass


def _frozen_safe_hooks() -> None:
    """MemTracker hooks every parameter's gradient, and torch refuses a hook on a frozen one
    (a LoRA base): those get none (they never have a gradient to count)."""
    for name in ("register_hook", "register_post_accumulate_grad_hook"):
        original = getattr(torch.Tensor, name)
        if getattr(original, "frozen_safe", False):
            continue

        def safe(self, hook, _original=original):
            return _original(self, hook) if self.requires_grad else _NoHook()

        safe.frozen_safe = True
        setattr(torch.Tensor, name, safe)


def tracked_peak(shape: dict, method: str, batch: int, seq: int, ckpt: bool) -> dict:
    """MemTracker's peak, in bytes by kind, for two fake training steps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model.enable_input_require_grads()
        # PEFT moves each new module onto its base layer's device and dtype with .to(), which
        # cannot swap fake parameters; built inside the fake mode they already are (fp32, cpu)
        to, torch.nn.Module.to = torch.nn.Module.to, lambda self, *a, **k: self
        try:
            model = get_method(MethodConfig(name=method)).apply(model)
        finally:
            torch.nn.Module.to = to
        model.train()
        opt = build_optimizer(get_method(MethodConfig(name=method)).optimizer_parameters(model),
                              TrainConfig(), "cpu")  # fmt: skip
        ids = torch.randint(3, shape["vocab_size"], (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.long)
        pos = torch.arange(seq).expand(batch, seq)
        _frozen_safe_hooks()
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            for _ in range(2):
                loss = every_target_loss(model, ids, mask, pos) / (batch * (seq - 1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values()))
    return {str(k).rsplit(".", 1)[-1]: v for k, v in by_kind.items()}


def every_target_loss(model, ids, mask, pos):
    """tunelab's loss (models.nll.causal_lm_nll_sum) with every target weighted: the same
    tensors, without the boolean-mask gather whose output shape fake tensors cannot know."""
    decoder, head, softcap = split_head(model)
    head_weight = head.weight  # called as a function: MemTracker counts a module called twice
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    rows = hidden.last_hidden_state[:, :-1].reshape(-1, hidden.last_hidden_state.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    return chunked_head_nll_sum(
        rows,
        lambda h: torch.nn.functional.linear(h, head_weight),
        softcap,
        targets,
        torch.ones(targets.shape),
        HEAD_CHUNK,
    )


def estimate(shape: dict, method: str, batch: int, seq: int, ckpt: bool):
    return estimate_memory(
        model_shape(shape), get_method(MethodConfig(name=method)),
        Activity(micro_batch=batch, seq_len=seq, weighted_tokens=batch * (seq - 1),
                 precision="fp32", device="cpu", gradient_checkpointing=ckpt),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", nargs="*", help="Case names to run (default: all).")
    ap.add_argument("--json", help="Write the rows here too.")
    args = ap.parse_args()
    rows = []
    print(f"torch {torch.__version__}; MiB; estimate = tensors (no runtime overhead)")
    print(f"{'case':<24} {'tracked':>9} {'estimate':>9} {'ratio':>6}  tracked by kind")
    for name, shape, method, batch, seq, ckpt in CASES:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        peak = tracked_peak(SHAPES[shape], method, batch, seq, ckpt)
        est = estimate(SHAPES[shape], method, batch, seq, ckpt)
        tracked, guessed = peak["Total"] / 2**20, est.tensors / 2**20
        kinds = " ".join(f"{k}={v / 2**20:.0f}" for k, v in peak.items() if k != "Total" and v)
        print(f"{name:<24} {tracked:>9.0f} {guessed:>9.0f} {guessed / tracked:>6.2f}  {kinds}"
              f"  ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        rows.append(dict(case=name, tracked_mib=round(tracked), estimate_mib=round(guessed),
                         ratio=round(guessed / tracked, 3), kinds={k: round(v / 2**20) for k, v in peak.items()},
                         estimate=est.as_dict()))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
