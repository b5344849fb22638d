"""`fusegrad bench`: timed Llama training steps, model FLOP/s against a measured sgemm peak, and a torch peer.

    fusegrad bench --preset stories15M --batch 8 --seq 256 --steps 5 --json --vs torch
    fusegrad bench --preset tiny --batch 2 --seq 16 --steps 2 --trace out.json

One step = loss forward + backward + global-norm clip (1.0) + AdamW (lr 3e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 on matrices only). With `--vs torch` each side runs in its own worker process (so peak RSS
is its own), both start from the same weights and get the same batches, and the parent alternates them
step by step (fusegrad first on even steps, torch first on odd ones); `speedup_vs_torch` is the median of
the per-pair ratios torch_step_s / fusegrad_step_s. The first step on each side is a warm-up whose loss is
compared (`losses_agree`): both sides do the same work from the same state.

Model FLOPs per step (nanoGPT / PaLM accounting): 6 N tokens + 12 L H D T tokens, where N counts every weight
a GEMM multiplies by (a tied embedding once, as the classifier; an untied input embedding is a lookup and is
left out) and the second term is attention's QK^T and PV, forward and backward, counted over the full T x T
square as PaLM does (a causal kernel does about half of it).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time training steps (tokens/s, FLOP/s, MFU, RSS), optionally vs torch",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="stories15M", help="model preset (tiny, stories260K, stories15M, ...)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vs", choices=["torch"], default=None, help="also time an equivalent PyTorch eager step")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--trace", default="", help="write a Chrome trace of fusegrad's timed steps here")
    p.add_argument("--lora", action="store_true", help="benchmark a LoRA fine-tuning step")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square sgemm measuring the peak")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_bench)


# -- figures ------------------------------------------------------------------------------------------
def gemm_params(config) -> int:
    """Weights that a GEMM multiplies by per token (see the module docstring)."""
    c = config
    per_layer = c.dim * (c.dim + 2 * c.kv_dim) + c.dim * c.dim + 3 * c.dim * c.hidden_dim
    return c.n_layers * per_layer + c.vocab_size * c.dim


def flops_per_step(config, batch: int, seq: int) -> float:
    tokens = batch * seq
    return 6.0 * gemm_params(config) * tokens + 12.0 * config.n_layers * config.n_heads * config.head_dim * seq * tokens


def sgemm_peak(n: int, repeats: int = 3) -> float:
    """Best FLOP/s of an (n, n) x (n, n) float32 numpy matmul over a few runs."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def batch_tokens(seed: int, step: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    return np.random.default_rng((seed, step)).integers(0, vocab, (batch, seq + 1))


# -- the two sides --------------------------------------------------------------------------------------
class FusegradSide:
    name = "fusegrad"

    def __init__(self, spec: dict):
        from fusegrad.backends import get_backend
        from fusegrad.core.tensor import tensor
        from fusegrad.models.llama import Llama, LlamaConfig
        from fusegrad.train.optim import AdamW, clip_grad_norm

        get_backend("numpy").prewarm_kernels()
        config = LlamaConfig.from_dict(spec["config"])
        weights = np.load(spec["weights"])
        self.model = Llama(config, params={n: tensor(weights[n], requires_grad=True) for n in weights.files})
        self.opt = AdamW(self.model.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        self.clip = clip_grad_norm

    def step(self, tokens) -> float:
        from fusegrad.core.trace import span

        loss = self.model.loss(tokens)
        loss.backward()
        with span("clip_grad_norm", "optimizer"):
            self.clip(self.model.parameters(), CLIP)
        with span("adamw", "optimizer"):
            self.opt.step()
        self.opt.zero_grad()
        return loss.item()


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


SIDES = {"fusegrad": FusegradSide, "torch": TorchSide}


def dispatch_counts() -> dict:
    from fusegrad.core.trace import TRACER

    return {k.split(":", 1)[1]: n for k, n in TRACER.counters.items() if k.startswith("dispatch:")}


class Worker:
    """One side, in this process; `ProcessWorker` runs the same protocol in a child process."""

    def __init__(self, side: str, spec: dict):
        t0 = time.perf_counter()
        self.spec = spec
        self.side = SIDES[side](spec)
        self.steps = 0
        self.init_s = time.perf_counter() - t0

    def step(self) -> dict:
        from fusegrad.core.trace import TRACER

        s = self.spec
        tokens = batch_tokens(s["seed"], self.steps, s["batch"], s["seq"], s["config"]["vocab_size"])
        before = dispatch_counts()
        t0 = time.perf_counter()
        loss = self.side.step(tokens)
        dt = time.perf_counter() - t0
        self.steps += 1
        if TRACER.enabled:
            TRACER.mark_step(self.steps)
        after = dispatch_counts()
        return {"step_s": dt, "loss": loss, "dispatches": {k: n - before.get(k, 0) for k, n in after.items()}}

    def start_trace(self) -> None:
        from fusegrad.core.trace import TRACER

        TRACER.reset()
        TRACER.enabled = True

    def finish(self) -> dict:
        from fusegrad.core.trace import TRACER

        if self.spec.get("trace") and TRACER.enabled:
            TRACER.save_chrome(self.spec["trace"])
            TRACER.enabled = False
        return {"peak_rss_mb": peak_rss_mb(), "init_s": self.init_s}


class ProcessWorker:
    def __init__(self, side: str, spec: dict):
        cmd = [sys.executable, "-m", "fusegrad.cli.bench", "--worker", side, json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.init_s = self._read()["init_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            from fusegrad.core.errors import BackendError

            raise BackendError(f"bench worker {self.proc.args[4]} exited with code {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def step(self) -> dict:
        return self._ask("step")

    def start_trace(self) -> None:
        self._ask("trace")

    def finish(self) -> dict:
        out = self._ask("finish")
        self.proc.wait()
        return out


def worker_main(side: str, spec_json: str) -> int:
    """The child's loop: one JSON line answers each command read from stdin."""
    worker = Worker(side, json.loads(spec_json))
    print(json.dumps({"init_s": worker.init_s}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            print(json.dumps(worker.step()), flush=True)
        elif command == "trace":
            worker.start_trace()
            print("{}", flush=True)
        elif command == "finish":
            print(json.dumps(worker.finish()), flush=True)
            return 0
    return 0


# -- the run -------------------------------------------------------------------------------------------
def summarize(results: list, flops: float, tokens: int, peak: float, first: dict, end: dict) -> dict:
    times = [r["step_s"] for r in results]
    median = statistics.median(times)
    model_flops = flops / median
    return {"tokens_per_s": tokens / median,
            "step_s": {"median": median, "min": min(times), "max": max(times)},
            "model_flops_per_s": model_flops, "mfu": model_flops / peak, "peak_rss_mb": end["peak_rss_mb"],
            "loss_step0": first["loss"], "init_s": end["init_s"], "first_step_s": first["step_s"],
            "dispatches_per_step": results[-1]["dispatches"]}


def check_lora() -> None:
    from fusegrad.core.errors import FusegradError

    try:
        import fusegrad.finetune as finetune
    except ImportError:
        finetune = None
    if finetune is None or not any("lora" in name.lower() for name in dir(finetune)):
        raise FusegradError("LoRA benchmark needs fusegrad.finetune with LoRA support, which it does not "
                            "have yet; run without --lora")
    raise FusegradError("LoRA benchmark needs fusegrad.finetune's LoRA API wired into `fusegrad bench` "
                        "(not done yet); run without --lora")


def run_bench(args) -> int:
    from fusegrad.core.errors import ShapeError
    from fusegrad.models.llama import Llama, preset

    if args.lora:
        check_lora()
    if args.steps < 1 or args.warmup < 1 or args.batch < 1 or args.seq < 1:
        raise ShapeError(f"bench: --steps, --warmup, --batch and --seq must be >= 1, got {args.steps}, "
                         f"{args.warmup}, {args.batch}, {args.seq}")
    config = preset(args.preset, max_seq_len=max(args.seq, 1))
    model = Llama(config, seed=args.seed)
    tokens, flops = args.batch * args.seq, flops_per_step(config, args.batch, args.seq)
    with tempfile.TemporaryDirectory(prefix="fusegrad-bench-") as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, **{n: t.data for n, t in model.params.items()})
        del model
        spec = {"config": config.to_dict(), "weights": weights, "batch": args.batch, "seq": args.seq,
                "seed": args.seed, "trace": os.path.abspath(args.trace) if args.trace else ""}
        sides = ["fusegrad"] + ([args.vs] if args.vs else [])
        make = ProcessWorker if args.vs else Worker
        workers = {side: make(side, spec) for side in sides}
        firsts = {side: [w.step() for _ in range(args.warmup)][0] for side, w in workers.items()}
        if args.trace:
            workers["fusegrad"].start_trace()
        results = {side: [] for side in sides}
        for i in range(args.steps):
            for side in (sides if i % 2 == 0 else sides[::-1]):  # alternate who goes first
                results[side].append(workers[side].step())
        ends = {side: w.finish() for side, w in workers.items()}
    peak = sgemm_peak(args.gemm_size)
    out = {"preset": args.preset, "config": config.to_dict(), "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "tokens_per_step": tokens, "gemm_params": gemm_params(config),
           "model_flops_per_step": flops, "sgemm_peak_flops_per_s": peak, "sgemm_size": args.gemm_size,
           "jit": os.environ.get("FUSEGRAD_JIT", "1") != "0"}
    out.update(summarize(results["fusegrad"], flops, tokens, peak, firsts["fusegrad"], ends["fusegrad"]))
    if args.trace:
        out["trace"] = spec["trace"]
    if args.vs:
        peer = summarize(results[args.vs], flops, tokens, peak, firsts[args.vs], ends[args.vs])
        peer.pop("dispatches_per_step")
        out[args.vs] = peer
        out[f"speedup_vs_{args.vs}"] = statistics.median(
            t["step_s"] / f["step_s"] for f, t in zip(results["fusegrad"], results[args.vs]))
        out[f"rss_ratio_vs_{args.vs}"] = out["peak_rss_mb"] / peer["peak_rss_mb"]
        out["losses_agree"] = abs(out["loss_step0"] - peer["loss_step0"]) <= 1e-3 * abs(peer["loss_step0"])
    print(json.dumps(out, indent=None if args.json else 2) if args.json else format_report(out, args.vs))
    return 0


def format_report(out: dict, vs) -> str:
    lines = [f"{out['preset']} batch {out['batch']} x seq {out['seq']}, {out['steps']} timed steps, "
             f"sgemm peak {out['sgemm_peak_flops_per_s'] / 1e9:.1f} GFLOP/s"]
    for name, row in [("fusegrad", out)] + ([(vs, out[vs])] if vs else []):
        s = row["step_s"]
        lines.append(f"{name:>9}: {row['tokens_per_s']:8.1f} tok/s  step {s['median']:.3f}s (min {s['min']:.3f}, "
                     f"max {s['max']:.3f})  {row['model_flops_per_s'] / 1e9:6.1f} GFLOP/s  MFU {row['mfu']:.2f}  "
                     f"RSS {row['peak_rss_mb']:.0f} MB  loss0 {row['loss_step0']:.4f}")
    lines.append(f"dispatches per step: {out['dispatches_per_step']}")
    if vs:
        lines.append(f"speedup vs {vs} (median of per-step ratios): {out[f'speedup_vs_{vs}']:.2f}x, "
                     f"RSS ratio {out[f'rss_ratio_vs_{vs}']:.2f}, step-0 losses agree: {out['losses_agree']}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    import argparse

    parser = argparse.ArgumentParser(prog="fusegrad")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench"] + sys.argv[1:])
    sys.exit(args.func(args))
