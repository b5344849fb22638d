"""Check fusegrad on a GPU in one run (under five minutes on a CUDA machine) and print the figures for
docs/gpu_mpi.md:

1. parity: one stories15M loss + backward on the device against the numpy backend (fp32; loss and every
   gradient within 1e-4, relative to the largest value of each gradient);
2. a stories110M-size training step (forward, backward, clip, AdamW) in fp32 and bf16: tokens/s of
   fusegrad next to PyTorch eager and torch.compile of the shared reference Llama (benchmarks/torch_llama.py)
   on the same device, in this run;
3. a LoRA step (q, v; r 8) next to transformers + peft on the same base.

    python scripts/gpu_verify.py                      # cuda
    python scripts/gpu_verify.py --device cpu --tiny   # tiny sizes, torch:cpu: what CI runs

The numpy side is the plain NumpyBackend (FUSEGRAD_JIT=0: no numba compile on a fresh machine). bf16 is
fusegrad's `--dtype bf16` (bf16 GEMMs and activations, fp32 master weights) against torch.autocast bf16. Each
torch.compile peer (one per dtype) runs in a child process, killed when its warm-up passes --compile-cap seconds
(the row then says so), so the whole run stays under five minutes and a cut-off never leaves torch's state in
this process half torn down. On CUDA each row also gives the device's peak memory. Exit status 1 when
parity fails.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("FUSEGRAD_JIT", "0")  # the reference: plain numpy, nothing to compile

import fusegrad as fg  # noqa: E402
from benchmarks.torch_llama import TorchLlama  # noqa: E402
from fusegrad.backends import get_backend  # noqa: E402
from fusegrad.finetune.lora import LoraConfig, attach_lora  # noqa: E402
from fusegrad.models.hf_names import HF_MODULES  # noqa: E402
from fusegrad.models.llama import Llama, LlamaConfig, preset  # noqa: E402
from fusegrad.train.optim import AdamW, clip_factor, grad_norm  # noqa: E402

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=256, max_seq_len=64)


def on_device(host: Llama, backend) -> Llama:
    return Llama(host.config, params={n: fg.tensor(t.numpy(), backend=backend, requires_grad=True)
                                      for n, t in host.params.items()})


def parity(cfg: LlamaConfig, be, batch: int, seq: int) -> bool:
    host = Llama(cfg, seed=0)
    dev = on_device(host, be)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
    want = host.loss(tokens)
    want.backward()
    got = dev.loss(tokens)
    got.backward()
    worst = max(float(np.abs(be.to_numpy(t.grad) - host.params[n].grad).max() / (np.abs(host.params[n].grad).max() + 1e-30))
                for n, t in dev.params.items())
    dloss = abs(got.item() - want.item())
    ok = dloss < 1e-4 and worst < 1e-4
    print(f"parity vs numpy ({cfg.dim}d x {cfg.n_layers} layers, {batch}x{seq}): |dloss| {dloss:.2e}, "
          f"worst grad {worst:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def timed(step, sync, steps: int) -> float:
    """Median seconds of `steps` calls after one warm-up."""
    step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_memory(device, reset: bool = False) -> str:
    """', peak N MB' of the device since the last reset (CUDA only)."""
    if device.type != "cuda":
        return ""
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return ""
    return f" ({torch.cuda.max_memory_allocated(device) / 2 ** 20:,.0f} MB peak)"


def torch_step(host: Llama, device, tokens, dtype: str, compiled: bool):
    """The reference Llama's training step on the device (its own copy of host's weights): loss under autocast
    for bf16, backward, clip 1.0, AdamW; `compiled`: the loss through torch.compile."""
    ref = TorchLlama.from_fusegrad(host)  # its own copy on the device (on the CPU it would share host's arrays)
    ref.p = {n: torch.nn.Parameter(p.detach().to(device).clone()) for n, p in ref.p.items()}
    ref.cos, ref.sin = ref.cos.to(device), ref.sin.to(device)
    t_tokens = torch.from_numpy(tokens).to(device)
    topt = torch.optim.AdamW(list(ref.p.values()), lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    loss_fn = torch.compile(ref.loss) if compiled else ref.loss

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_fn(t_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.p.values()), 1.0)
        topt.step()
        topt.zero_grad(set_to_none=True)
    return step


def _compiled_steps(conn, cfg: dict, device: str, tokens, dtype: str, steps: int) -> None:
    """A child process's torch.compile row: sends ("ready",) once set up, ("warm", seconds) after the warm-up,
    then ("median", seconds) of the timed steps, or ("error", text)."""
    try:
        be = get_backend(f"torch:{device}")
        step = torch_step(Llama(LlamaConfig(**cfg), seed=0), be.device, tokens, dtype, compiled=True)
        conn.send(("ready",))
        t0 = time.perf_counter()
        step()
        be.synchronize()
        conn.send(("warm", time.perf_counter() - t0))
        conn.send(("median", timed(step, be.synchronize, steps)))
    except Exception as exc:  # no compiler toolchain, an unsupported op, ...
        conn.send(("error", f"{type(exc).__name__}: {str(exc)[:120]}"))


def compiled_row(cfg: LlamaConfig, device, tokens, dtype: str, steps: int, cap_s: int):
    """(median seconds, warm-up seconds) of torch.compile's step from a child process, or a line saying why
    there is none: its warm-up passed cap_s (the child is killed), or torch.compile failed."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this process's torch state
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_compiled_steps, args=(child, cfg.to_dict(), str(device), tokens, dtype, steps))
    proc.start()
    try:
        answer, warm = ("error", "the child process died while starting"), None
        for wait in (600, cap_s, 600):  # set-up (imports, device), the warm-up within the cap, the timed steps
            if not parent.poll(wait):
                answer = ("cut",) if answer[0] == "ready" else ("error", f"no answer in {wait} s")
                break
            answer = parent.recv()
            if answer[0] == "warm":
                warm = answer[1]
            elif answer[0] != "ready":
                break
    except EOFError:
        answer = ("error", "the child process died")
    finally:
        proc.kill()
        proc.join()
    if answer[0] == "median":
        return answer[1], warm
    if answer[0] == "cut":
        return f"  torch.compile: warm-up cut off after {cap_s} s (--compile-cap)"
    return f"  torch.compile unavailable: {answer[1]}"


def full_steps(cfg, be, device, batch, seq, steps, compile_cap):
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, seq + 1))
    host = Llama(cfg, seed=0)
    for dtype in ("fp32", "bf16"):
        model = on_device(host, be)
        opt = AdamW(model.named_parameters(), lr=3e-4)

        def ours():
            with be.precision(dtype):
                model.loss(tokens).backward()
            opt.step(grad_scale=clip_factor(grad_norm(opt.params), 1.0, be.xp))  # as train/loop.py: clip folded in
            opt.zero_grad()
        peak_memory(device, reset=True)
        row = {"fusegrad": timed(ours, be.synchronize, steps)}
        memory = {"fusegrad": peak_memory(device)}
        del model, opt
        peak_memory(device, reset=True)
        row["torch eager"] = timed(torch_step(host, device, tokens, dtype, compiled=False), be.synchronize, steps)
        memory["torch eager"] = peak_memory(device)
        if compile_cap:
            compiled = compiled_row(cfg, device, tokens, dtype, steps, compile_cap)
            if isinstance(compiled, str):
                print(compiled)
            else:
                row["torch.compile"] = compiled[0]
                memory["torch.compile"] = f" (warm-up {compiled[1]:.0f} s)"
        print(f"training step {dtype} ({cfg.dim}d x {cfg.n_layers} layers, {batch}x{seq}): "
              + ", ".join(f"{k} {batch * seq / s:,.0f} tok/s{memory.get(k, '')}" for k, s in row.items())
              + f" ({row['torch eager'] / row['fusegrad']:.2f}x eager)")


def lora_step(cfg, be, device, batch, seq, steps):
    from benchmarks.peers import PeftSide

    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (batch, seq + 1))
    host = Llama(cfg, seed=0)
    model = on_device(host, be)
    lora = attach_lora(model, LoraConfig(targets="q,v", r=8, alpha=16))
    opt = AdamW(lora.named_parameters(), lr=1e-3, weight_decay=0.0)

    def ours():
        model.loss(tokens).backward()
        opt.step(grad_scale=clip_factor(grad_norm(opt.params), 1.0, be.xp))
        opt.zero_grad()
    row = {"fusegrad": timed(ours, be.synchronize, steps)}
    spec = {"config": cfg.to_dict(), "seed": 0, "lora": {"qlora": False, "rank": 8, "alpha": 16,
                                                         "peft_target_modules": [HF_MODULES[t].split(".")[-1] for t in "qv"]}}
    side = PeftSide(spec)
    side.model.to(device)
    t_tokens = torch.from_numpy(tokens).to(device)

    def peft_step():
        logits = side.model(input_ids=t_tokens[:, :-1], use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), t_tokens[:, 1:].reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(side.params, 1.0)
        side.opt.step()
        side.opt.zero_grad(set_to_none=True)
    row["transformers + peft"] = timed(peft_step, be.synchronize, steps)
    print(f"LoRA step fp32 (q,v r8, {batch}x{seq}): " + ", ".join(f"{k} {batch * seq / s:,.0f} tok/s" for k, s in row.items())
          + f" ({row['transformers + peft'] / row['fusegrad']:.2f}x peft)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | mps | cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a check that the script runs, not figures)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    p.add_argument("--compile-cap", type=int, default=75,
                   help="seconds a torch.compile warm-up may take before it is cut off (0: no torch.compile peer)")
    p.add_argument("--no-compile", dest="compile_cap", action="store_const", const=0, help="skip the torch.compile peer")
    args = p.parse_args(argv)
    start = time.perf_counter()
    be = get_backend(f"torch:{args.device}")
    device = be.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"fusegrad gpu_verify on {name} (torch {torch.__version__})")
    if args.tiny:
        small = big = LlamaConfig(**TINY)
        sizes = dict(batch=2, seq=32)
    else:
        small, big = preset("stories15M"), preset("stories110M")
        sizes = dict(batch=8, seq=256)
    ok = parity(small, be, 2 if args.tiny else 4, sizes["seq"])
    full_steps(big, be, device, sizes["batch"], sizes["seq"], args.steps, args.compile_cap)
    lora_step(big, be, device, sizes["batch"], sizes["seq"], args.steps)
    print(f"done in {time.perf_counter() - start:.0f} s; parity {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
