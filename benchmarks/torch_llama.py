"""An independent Llama in PyTorch, written from llama2.c's conventions (Linear weights (out, in), RoPE that
rotates interleaved pairs (x[2i], x[2i+1]) by t * theta^(-2i/D), RMSNorm, SwiGLU, grouped-query attention):
the reference the model tests check fusegrad against (float64, tests/models/test_llama.py) and the peer of
`fusegrad bench --vs torch` (float32 eager, SDPA; on fusegrad's device, under torch.autocast for bf16/fp16). It holds its weights under fusegrad's names, with Q/K/V
and W1/W3 fused as fusegrad fuses them, and writes them as llama2.c `.bin` files and Hugging Face
directories (from docs/FORMATS.md, byte by byte) for the format tests.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_ORDER = ("emb", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm")


class TorchLlama:
    """Random weights from `seed` (float32 values held in float64, for the tests), or `weights`: fusegrad's
    parameter name -> array, kept in its dtype (a Llama's weights, for the benchmark: `from_fusegrad`)."""

    def __init__(self, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, tied, seed=0,
                 eps=1e-5, theta=10000.0, weights=None, head_dim=None):
        self.dim, self.hidden, self.L, self.H, self.Hkv = dim, hidden_dim, n_layers, n_heads, n_kv_heads
        self.D = head_dim or dim // n_heads
        self.V, self.seq_len, self.tied, self.eps, self.theta = vocab_size, seq_len, tied, eps, theta
        weights = self._fuse(self._random(seed)) if weights is None else weights
        self.p = {n: torch.nn.Parameter(torch.from_numpy(w) if isinstance(w, np.ndarray) else w)
                  for n, w in weights.items()}
        D = self.D
        angle = torch.outer(torch.arange(seq_len, dtype=torch.float64),
                            theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D))  # (T, D/2)
        emb = self.p["tok_embeddings"]
        self.cos, self.sin = (f(angle).to(emb.device, emb.dtype)[:, None, :] for f in (torch.cos, torch.sin))

    @classmethod
    def from_fusegrad(cls, model, device: str = "cpu") -> "TorchLlama":
        """The same weights as a fusegrad Llama: on the CPU shared with its numpy arrays, else copied to `device`."""
        c = model.config
        weights = {n: t.numpy() for n, t in model.params.items()}
        if torch.device(device).type != "cpu":
            weights = {n: torch.from_numpy(w).to(device) for n, w in weights.items()}
        return cls(c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len,
                   c.tie_embeddings, eps=c.norm_eps, theta=c.rope_theta, weights=weights, head_dim=c.head_dim)

    def _random(self, seed) -> dict:
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, std=0.15, mean=0.0):  # float32 values (what a .bin holds), kept in float64
            return (mean + std * torch.randn(*shape, generator=g)).float().double()
        L, dim, q, kv, hidden = self.L, self.dim, self.D * self.H, self.D * self.Hkv, self.hidden
        w = {"emb": rand(self.V, dim, std=0.5), "att_norm": rand(L, dim, mean=1.0, std=0.2),
             "wq": rand(L, q, dim), "wk": rand(L, kv, dim), "wv": rand(L, kv, dim), "wo": rand(L, dim, q),
             "ffn_norm": rand(L, dim, mean=1.0, std=0.2), "w1": rand(L, hidden, dim), "w2": rand(L, dim, hidden),
             "w3": rand(L, hidden, dim), "norm": rand(dim, mean=1.0, std=0.2)}
        if not self.tied:
            w["cls"] = rand(self.V, dim, std=0.5)
        return w

    def _fuse(self, w) -> dict:
        """llama2.c layout (per-kind stacks over layers) -> fusegrad's names (fused wqkv, w13)."""
        out = {"tok_embeddings": w["emb"], "norm": w["norm"]}
        for i in range(self.L):
            out.update({f"layers.{i}.attention_norm": w["att_norm"][i],
                        f"layers.{i}.wqkv": torch.cat([w["wq"][i], w["wk"][i], w["wv"][i]]),
                        f"layers.{i}.wo": w["wo"][i], f"layers.{i}.ffn_norm": w["ffn_norm"][i],
                        f"layers.{i}.w13": torch.cat([w["w1"][i], w["w3"][i]]), f"layers.{i}.w2": w["w2"][i]})
        if not self.tied:
            out["output"] = w["cls"]
        return out

    def _split(self, p) -> dict:
        """fusegrad's names -> llama2.c layout: the inverse of _fuse (of weights or of their grads)."""
        D = self.D
        layers = [[p[f"layers.{i}.{k}"] for i in range(self.L)] for k in ("attention_norm", "wqkv", "wo", "ffn_norm",
                                                                         "w13", "w2")]
        att_norm, wqkv, wo, ffn_norm, w13, w2 = (torch.stack(x) for x in layers)
        wq, wk, wv = wqkv.split([self.H * D, self.Hkv * D, self.Hkv * D], dim=1)
        w1, w3 = w13.chunk(2, dim=1)
        out = {"emb": p["tok_embeddings"], "att_norm": att_norm, "wq": wq, "wk": wk, "wv": wv, "wo": wo,
               "ffn_norm": ffn_norm, "w1": w1, "w2": w2, "w3": w3, "norm": p["norm"]}
        if not self.tied:
            out["cls"] = p["output"]
        return out

    def rope(self, x):  # x (B, T, H, D)
        T = x.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def loss(self, tokens):
        """Mean next-token cross-entropy of tokens (B, T+1)."""
        p, H, Hkv = self.p, self.H, self.Hkv
        tokens = torch.as_tensor(tokens).to(p["tok_embeddings"].device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        B, T = inputs.shape
        D = self.D
        x = F.embedding(inputs, p["tok_embeddings"])
        for i in range(self.L):
            qkv = F.linear(self.rms(x, p[f"layers.{i}.attention_norm"]), p[f"layers.{i}.wqkv"])
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = self.rope(q.view(B, T, H, D)).transpose(1, 2)
            k = self.rope(k.view(B, T, Hkv, D)).transpose(1, 2)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, H * D), p[f"layers.{i}.wo"])
            h1, h3 = F.linear(self.rms(x, p[f"layers.{i}.ffn_norm"]), p[f"layers.{i}.w13"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(h1) * h3, p[f"layers.{i}.w2"])
        logits = F.linear(self.rms(x, p["norm"]), p["tok_embeddings"] if self.tied else p["output"])
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1))

    # -- files, written here from FORMATS.md --------------------------------------------------------------
    def arrays(self):
        """The weights in llama2.c layout, float32 numpy."""
        return {k: v.detach().float().numpy() for k, v in self._split(self.p).items()}

    def write_llama2c(self, path, version):
        a, D = self.arrays(), self.dim // self.H
        dims = [self.dim, self.hidden, self.L, self.H, self.Hkv, self.V, self.seq_len]
        with open(path, "wb") as f:
            if version == 0:
                dims[5] = self.V if self.tied else -self.V
                f.write(struct.pack("<7i", *dims))
                ang = np.outer(np.arange(self.seq_len), self.theta ** (-np.arange(0, D, 2) / D))
                blobs = [a[k] for k in SPLIT_ORDER] + [np.cos(ang), np.sin(ang)]
            else:
                head = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, int(self.tied))
                f.write(head + bytes(256 - len(head)))
                order = ["att_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
                blobs = [a[k] for k in order]
            if not self.tied:
                blobs.append(a["cls"])
            for b in blobs:
                f.write(np.ascontiguousarray(b, dtype="<f4").tobytes())

    def hf_state(self, arrays=None):
        """llama2.c-layout arrays (weights or grads) -> HF names, q/k rows permuted for rotate-half RoPE."""
        a = self.arrays() if arrays is None else arrays

        def perm(w, heads):  # view (heads, D/2, 2, dim) -> swap the middle axes
            return w.reshape(heads, -1, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)
        out = {"model.embed_tokens.weight": a["emb"], "model.norm.weight": a["norm"]}
        for i in range(self.L):
            p = f"model.layers.{i}."
            out.update({p + "input_layernorm.weight": a["att_norm"][i],
                        p + "self_attn.q_proj.weight": perm(a["wq"][i], self.H),
                        p + "self_attn.k_proj.weight": perm(a["wk"][i], self.Hkv),
                        p + "self_attn.v_proj.weight": a["wv"][i], p + "self_attn.o_proj.weight": a["wo"][i],
                        p + "post_attention_layernorm.weight": a["ffn_norm"][i],
                        p + "mlp.gate_proj.weight": a["w1"][i], p + "mlp.up_proj.weight": a["w3"][i],
                        p + "mlp.down_proj.weight": a["w2"][i]})
        if not self.tied:
            out["lm_head.weight"] = a["cls"]
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    def loss_and_hf_grads(self, tokens):
        for t in self.p.values():
            t.grad = None
        loss = self.loss(tokens)
        loss.backward()
        grads = {k: v.numpy() for k, v in self._split({n: t.grad for n, t in self.p.items()}).items()}
        return float(loss.detach()), self.hf_state(grads)

    def write_hf_dir(self, directory):
        from safetensors.numpy import save_file

        directory.mkdir(exist_ok=True)
        save_file(self.hf_state(), str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({
            "model_type": "llama", "hidden_size": self.dim, "intermediate_size": self.hidden,
            "num_hidden_layers": self.L, "num_attention_heads": self.H, "num_key_value_heads": self.Hkv,
            "head_dim": self.D,
            "vocab_size": self.V, "max_position_embeddings": self.seq_len, "rms_norm_eps": self.eps,
            "rope_theta": self.theta, "tie_word_embeddings": self.tied}))
