"""The peers `fusegrad bench` times fusegrad against, each one training step from the same weights on the
same batches as fusegrad's side (fusegrad.cli.bench.FusegradSide: the product's own step).

- TorchSide (`--vs torch`): the same Llama in PyTorch eager (benchmarks/torch_llama.py), the full step as
  fusegrad's: loss forward + backward + global-norm clip (1.0) + AdamW (lr 3e-4, betas (0.9, 0.95), eps 1e-8,
  weight decay 0.1 on matrices only). On fusegrad's device, in its dtype: bf16/fp16 under torch.autocast
  (fp32 weights, GEMMs in the low precision), fp16 with a GradScaler.
- PeftSide (`--vs peft`, with --lora): transformers' LlamaForCausalLM + peft on the same base; with qlora its
  projections are bitsandbytes NF4 (double-quantized, blocksize 64) like fusegrad's. The LoRA step as
  fusegrad's: forward + backward (adapters only) + clip (1.0) + AdamW (lr 1e-3, betas (0.9, 0.95), eps 1e-8,
  no weight decay).
"""
from __future__ import annotations

import os
import re
import tempfile

import torch
import torch.nn.functional as F

from benchmarks.torch_llama import TorchLlama
from fusegrad.backends.torch_backend import resolve_device
from fusegrad.cli.bench import FULL_STEP, LORA_STEP, base_model

BETAS, EPS, CLIP = (0.9, 0.95), 1e-8, 1.0
# the kernels torch's GEMMs run: its BLAS (MKL here) and the vector ISA its CPU kernels were chosen for
BLAS = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
KERNELS = f"torch {torch.__version__}, BLAS {BLAS and BLAS.group(1)}, {torch.backends.cpu.get_cpu_capability()}"


class TorchSide:
    name = "torch"

    def __init__(self, spec: dict):
        backend, self.dtype = spec["backend"], spec.get("dtype", "fp32")
        # fusegrad's device: torch:<device>, bare torch the best present, any other backend the CPU
        device = resolve_device(backend.partition(":")[2] or None if backend.startswith("torch") else "cpu")
        self.info = {"kernels": KERNELS if device.type == "cpu" else f"torch {torch.__version__} on "
                     f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}"}
        if self.dtype != "fp32":
            self.info["kernels"] += f", autocast {self.dtype}"
        if device.type != "cpu":
            self.info["peak_on"] = [str(device), self.dtype]
        self.model = TorchLlama.from_fusegrad(base_model(spec), device)
        self.autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.dtype), enabled=self.dtype != "fp32")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == "fp16")
        params = list(self.model.p.values())
        self.opt = torch.optim.AdamW([{"params": [t for t in params if t.ndim >= 2], "weight_decay": FULL_STEP["weight_decay"]},
                                      {"params": [t for t in params if t.ndim < 2], "weight_decay": 0.0}],
                                     lr=FULL_STEP["lr"], betas=BETAS, eps=EPS)

    def step(self, tokens) -> float:
        with self.autocast:
            loss = self.model.loss(tokens)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(list(self.model.p.values()), CLIP)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class PeftSide:
    name = "peft"

    def __init__(self, spec: dict):
        self.info = {"kernels": KERNELS}
        import transformers
        from peft import LoraConfig, get_peft_model

        lora = spec["lora"]
        quant = None
        if lora["qlora"]:
            quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.float32)
        with tempfile.TemporaryDirectory(prefix="fusegrad-bench-") as tmp:
            base_model(spec).save_pretrained(os.path.join(tmp, "hf"))
            base = transformers.LlamaForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=torch.float32,
                                                                 quantization_config=quant)
        config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                            target_modules=lora["peft_target_modules"], use_dora=lora.get("dora", False))
        self.model = get_peft_model(base, config).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, betas=BETAS, eps=EPS, **LORA_STEP)

    def step(self, tokens) -> float:
        tokens = torch.from_numpy(tokens)
        logits = self.model(input_ids=tokens[:, :-1], use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()
