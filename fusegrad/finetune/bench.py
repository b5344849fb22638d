"""A LoRA training step ready to time, for `fusegrad bench --lora` (the peer is PyTorch + peft on the
same config: a LlamaForCausalLM from `model.save_pretrained(dir)`, `get_peft_model(..., LoraConfig(
r=rank, lora_alpha=alpha, target_modules=[HF names of targets], lora_dropout=0))`, AdamW on its
trainable parameters, the same tokens).

>>> step, info = lora_train_step_setup("tiny", targets="q,v", rank=4, batch=2, seq=16)
>>> loss = step(); info["trainable_params"] > 0, info["tokens_per_step"]
(True, 32)
"""
from __future__ import annotations

import numpy as np

from fusegrad.finetune.lora import HF_MODULES, LoraConfig, attach_lora


def lora_train_step_setup(config="tiny", targets="q,v", rank: int = 8, alpha: float = 16.0, batch: int = 4,
                          seq: int = 64, qlora: bool = False, lr: float = 1e-3, seed: int = 0) -> tuple:
    """-> (step() -> loss float, info). `config` is a preset name, a LlamaConfig or a Llama model.

    step() runs forward, backward (adapters only; base frozen, or NF4 with qlora=True) and AdamW on a
    fixed random batch (B, seq+1). info: model, lora, tokens, tokens_per_step, trainable_params,
    peft_target_modules (the HF names for the peer's LoraConfig), memory (QLoRA bytes report or None).
    """
    from fusegrad.finetune.qlora import attach_qlora
    from fusegrad.models import Llama
    from fusegrad.models.llama import preset
    from fusegrad.train.optim import AdamW

    if isinstance(config, Llama):
        model = config
    else:
        model = Llama(preset(config) if isinstance(config, str) else config, seed=seed)
    cfg = LoraConfig(targets=targets, r=rank, alpha=alpha, seed=seed)
    lora, memory = attach_qlora(model, cfg) if qlora else (attach_lora(model, cfg), None)
    opt = AdamW(lora.named_parameters(), lr=lr, weight_decay=0.0)
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seq + 1))

    def step() -> float:
        loss = model.loss(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    info = {"model": model, "lora": lora, "tokens": tokens, "tokens_per_step": batch * seq,
            "trainable_params": sum(t.numel() for t in lora.parameters()),
            "peft_target_modules": [HF_MODULES[t].split(".")[1] for t in cfg.targets], "memory": memory}
    return step, info
