"""The sides `fusegrad bench` times: one training step each, from the same weights on the same batches.

- FusegradSide: the full-model step on any backend (`--backend`), data-parallel over MPI ranks when
  mpirun started several (`--ranks`); with `spec["lora"]` the LoRA/QLoRA step of fusegrad.finetune.
- TorchSide: the same Llama in PyTorch eager (the `--vs torch` peer of the full-model step).
- PeftSide: transformers' LlamaForCausalLM + peft on the same base (the `--vs peft` peer of `--lora`);
  with qlora its projections are bitsandbytes NF4 (double-quantized, blocksize 64) like fusegrad's.

Full step = loss forward + backward + global-norm clip (1.0) + AdamW (lr 3e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 on matrices only). LoRA step = forward + backward (adapters only) + AdamW on the adapters
(lr 1e-3, betas (0.9, 0.95), eps 1e-8, no weight decay, no clip), as in fusegrad.finetune.bench.
"""
from __future__ import annotations

import numpy as np

LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
LORA_LR = 1e-3  # lora_train_step_setup's default


class FusegradSide:
    name = "fusegrad"

    def __init__(self, spec: dict):
        from fusegrad.backends import get_backend, set_default_backend
        from fusegrad.core.tensor import tensor
        from fusegrad.models.llama import Llama, LlamaConfig
        from fusegrad.parallel.mpi import DataParallel
        from fusegrad.train.optim import AdamW, clip_grad_norm

        get_backend("numpy").prewarm_kernels()
        set_default_backend(spec["backend"])  # the model's tensors are made on it
        config = LlamaConfig.from_dict(spec["config"])
        weights = np.load(spec["weights"])
        self.model = Llama(config, params={n: tensor(weights[n], requires_grad=True) for n in weights.files})
        self.dp = DataParallel.from_env()  # None unless mpirun started several ranks
        self.info, self.lora_step, self.workers = {}, None, None
        if spec.get("lora"):
            self._setup_lora(spec)
            return
        self.opt = AdamW(self.model.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        self.clip = clip_grad_norm
        self._setup_workers(spec)

    def _setup_workers(self, spec: dict) -> None:
        """One process per core, each on a slice of the batch, as `fusegrad train` does by default."""
        from fusegrad.parallel.workers import ProcessDataParallel, choose_workers

        rows = spec["batch"] // (self.dp.size if self.dp is not None else 1)
        n = choose_workers(spec.get("workers", 0), rows, spec["backend"] == "numpy" and self.dp is None)
        self.info["workers"] = n
        if n > 1:
            self.workers = ProcessDataParallel(self.model, n)

    def helpers_peak_rss_mb(self) -> float:
        return self.workers.helpers_peak_rss_mb() if self.workers is not None else 0.0

    def _setup_lora(self, spec: dict) -> None:
        from fusegrad.finetune.bench import lora_train_step_setup

        lora = spec["lora"]
        self.lora_step, info = lora_train_step_setup(self.model, lora["targets"], lora["rank"], lora["alpha"],
                                                     spec["batch"], spec["seq"], lora["qlora"], lr=LORA_LR,
                                                     seed=spec["seed"])
        self.lora_tokens = info["tokens"]  # the (B, T+1) batch its step() reads: refilled before each step
        self.info = {k: info[k] for k in ("trainable_params", "peft_target_modules", "memory")}

    def step(self, tokens) -> float:
        from fusegrad.core.trace import span

        if self.lora_step is not None:
            self.lora_tokens[...] = tokens
            return self.lora_step()
        dp = self.dp
        tokens = tokens if dp is None else dp.shard(tokens)
        if self.workers is not None:
            value = self.workers.loss_backward(tokens)
        else:
            loss = self.model.loss(tokens)
            loss.backward()
            value = loss.item()
        if dp is not None:  # mean over ranks = the grads of the global batch
            dp.allreduce_grads(self.model.parameters())
        with span("clip_grad_norm", "optimizer"):
            self.clip(self.model.parameters(), CLIP)
        with span("adamw", "optimizer"):
            self.opt.step()
        self.opt.zero_grad()
        return value if dp is None else dp.average(value)


class TorchSide:
    """The same Llama in PyTorch eager: fused wqkv / w13 weights, interleaved RoPE, SDPA, full logits."""
    name = "torch"

    def __init__(self, spec: dict):
        import torch

        self.torch, c = torch, spec["config"]
        self.c = c
        weights = np.load(spec["weights"])
        self.p = {n: torch.nn.Parameter(torch.from_numpy(weights[n].copy())) for n in weights.files}
        head = c["dim"] // c["n_heads"]
        freqs = 1.0 / c["rope_theta"] ** (torch.arange(0, head, 2, dtype=torch.float64) / head)
        angles = torch.outer(torch.arange(c["max_seq_len"], dtype=torch.float64), freqs)
        self.cos, self.sin = torch.cos(angles).float(), torch.sin(angles).float()
        decay = [t for t in self.p.values() if t.ndim >= 2]
        other = [t for t in self.p.values() if t.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                      {"params": other, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)

    def rope(self, x, T):  # x (B, T, H, D), pairs (2i, 2i+1)
        cos, sin = self.cos[:T, None, :], self.sin[:T, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return self.torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    def loss(self, tokens):
        torch, c, p = self.torch, self.c, self.p
        F = torch.nn.functional
        tokens = torch.from_numpy(tokens)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        B, T = inputs.shape
        H, Hkv = c["n_heads"], c["n_kv_heads"]
        D = c["dim"] // H

        def norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["norm_eps"]) * w

        x = F.embedding(inputs, p["tok_embeddings"])
        for i in range(c["n_layers"]):
            qkv = F.linear(norm(x, p[f"layers.{i}.attention_norm"]), p[f"layers.{i}.wqkv"])
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = self.rope(q.view(B, T, H, D), T).transpose(1, 2)
            k = self.rope(k.view(B, T, Hkv, D), T).transpose(1, 2)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, H * D), p[f"layers.{i}.wo"])
            h1, h3 = F.linear(norm(x, p[f"layers.{i}.ffn_norm"]), p[f"layers.{i}.w13"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(h1) * h3, p[f"layers.{i}.w2"])
        classifier = p["tok_embeddings"] if c["tie_embeddings"] else p["output"]
        logits = F.linear(norm(x, p["norm"]), classifier)
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1))

    def step(self, tokens) -> float:
        loss = self.loss(tokens)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(list(self.p.values()), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class PeftSide:
    """transformers' LlamaForCausalLM from the same base (an HF directory) wrapped by peft's LoRA."""
    name = "peft"

    def __init__(self, spec: dict):
        import torch
        import transformers
        from peft import LoraConfig, get_peft_model

        self.torch, lora = torch, spec["lora"]
        quant = None
        if lora["qlora"]:
            quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True,
                                                    bnb_4bit_compute_dtype=torch.float32)
        base = transformers.LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32,
                                                             quantization_config=quant)
        config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                            target_modules=lora["peft_target_modules"])
        self.model = get_peft_model(base, config).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LORA_LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    def step(self, tokens) -> float:
        F = self.torch.nn.functional
        tokens = self.torch.from_numpy(tokens)
        logits = self.model(input_ids=tokens[:, :-1], use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


SIDES = {"fusegrad": FusegradSide, "torch": TorchSide, "peft": PeftSide}
