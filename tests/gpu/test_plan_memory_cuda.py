"""The memory estimate against the GPU's own peak (torch.cuda.max_memory_allocated) for a
135M-shape model with random weights: LoRA bf16 and full fine-tuning. Skipped without a GPU
(conftest); docs/plan.md says which rows were measured on which device."""

import pytest
import torch

from tunelab.config.schema import MethodConfig, TrainConfig
from tunelab.models.memory import Activity, estimate_memory
from tunelab.models.methods import get_method
from tunelab.models.nll import causal_lm_nll_sum
from tunelab.models.shape import model_shape
from tunelab.train.optim import build_optimizer

pytestmark = pytest.mark.gpu

SHAPE = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
             head_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


@pytest.mark.parametrize("name", ["lora", "full"])
def test_estimate_is_within_25_percent_of_the_cuda_peak(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    batch, seq = 8, 512
    method = get_method(MethodConfig(name=name))
    dtype = torch.float32 if method.trains_base else torch.bfloat16
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPE), dtype=dtype).cuda()
    model = method.apply(model)
    opt = build_optimizer(method.optimizer_parameters(model), TrainConfig(), "cuda")
    ids = torch.randint(3, SHAPE["vocab_size"], (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    pos = torch.arange(seq, device="cuda").expand(batch, seq)
    weights = torch.ones(batch, seq, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = causal_lm_nll_sum(model, ids, mask, pos, weights) / weights.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    act = Activity(micro_batch=batch, seq_len=seq, weighted_tokens=batch * (seq - 1),
                   precision="bf16", device="cuda")  # fmt: skip
    estimate = estimate_memory(model_shape(SHAPE), method, act).tensors
    print(f"{name}: estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert 0.75 < estimate / measured < 1.25
