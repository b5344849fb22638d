"""Parts of a step, done the earlier way and the current way, alternating in one process (medians):

1. the optimizer tail of a stories15M step: `clip_grad_norm` (norm, then a pass scaling every grad) + AdamW,
   against `grad_norm` + `AdamW.step(grad_scale=clip_factor(...))` (the factor folded into AdamW's pass);
2. LoRA's rank-r adds at stories15M shapes (1024 rows; fused qkv of 3 parts of 288, r 8): y[:, rows] +=
   u_p B_p^T and dx += du A through numpy temporaries, against `gemm_accumulate` (one sgemm with beta = 1);
3. a tied embedding's grad (1024 rows) into the classifier's dW, at stories15M's (32000, 288) and
   SmolLM2-135M's (49152, 576): a dense (V, C) grad added in, against `embedding_backward_into` (autograd's
   `RowsGrad`);
4. the classifier with a frozen weight (a LoRA step's), at stories15M's 1024 rows x (32000, 288) and SmolLM2-135M's
   512 rows x (49152, 576): one (n, V) logits buffer (VOCAB_BLOCK = V, as before) against vocabulary blocks of
   `cpu_jit.VOCAB_BLOCK` columns;
5. one layer's attention, forward + backward, at the workers' slices of stories15M (4 x 256, 6 heads of 48),
   stories110M (2 x 256, 12 of 64) and SmolLM2-135M (2 x 256, 9 heads of 64 on 3 kv heads): query blocks of
   ATTENTION_BLOCK rows against the JIT backend's `query_block(T)`.
Run a part as the workers do, too: one thread in each of two processes at once,

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_step_parts.py --only classifier &
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_step_parts.py --only classifier

    PYTHONPATH=. python benchmarks/bench_step_parts.py [--rounds 30] [--only attention]
"""
import argparse
import statistics

import numpy as np

from benchmarks.bench_qlora import alternate

from fusegrad.backends import cpu_jit, get_backend
from fusegrad.backends.base import ATTENTION_BLOCK, rope_tables
from fusegrad.backends.cpu_jit_attention import query_block
from fusegrad.models.llama import Llama
from fusegrad.train.optim import AdamW, clip_factor, clip_grad_norm, grad_norm


def medians(cases: dict, rounds: int, before=None) -> dict:
    """{name: median seconds a call}, each case called once untimed first, then in turn (bench_qlora's alternate)."""
    for fn in cases.values():
        (before or (lambda: None))()
        fn()
    return {name: statistics.median(t) for name, t in alternate(cases, rounds, before).items()}


def optimizer_tail(rounds: int) -> dict:
    model = Llama.from_preset("stories15M", seed=0)
    opt = AdamW(model.named_parameters(), lr=3e-4)
    rng = np.random.default_rng(0)
    grads = {n: rng.standard_normal(t.shape).astype(np.float32) for n, t in model.params.items()}

    def fresh_grads():
        for n, t in model.params.items():
            t.grad = grads[n].copy()

    def earlier():
        clip_grad_norm(opt.params, 1.0)
        opt.step()

    return medians({"clip_grad_norm + step()": earlier,
                      "grad_norm + step(grad_scale)": lambda: opt.step(grad_scale=clip_factor(grad_norm(opt.params), 1.0))},
                     rounds, fresh_grads)


def lora_adds(rounds: int) -> dict:
    be = get_backend("numpy")
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    N, C, r, parts = 1024, 288, 8, 3
    y, us, du, dx, A = f32(N, parts * C), f32(N, parts * r), f32(N, parts * r), f32(N, C), f32(parts * r, C)
    Bs = [f32(C, r) for _ in range(parts)]

    def earlier():
        for p in range(parts):
            y[:, p * C:(p + 1) * C] += be.gemm(us[:, p * r:(p + 1) * r], Bs[p], trans_b=True)
        dx[:] += be.gemm(du, A)

    def current():
        for p in range(parts):
            be.gemm_accumulate(y[:, p * C:(p + 1) * C], us[:, p * r:(p + 1) * r], Bs[p], trans_b=True)
        be.gemm_accumulate(dx, du, A)

    return medians({"numpy temporaries": earlier, "gemm_accumulate": current}, rounds * 10)


def tied_embedding_grad(rounds: int, vocab: int, dim: int) -> dict:
    be = get_backend("numpy")
    rng = np.random.default_rng(0)
    dw, g = rng.standard_normal((vocab, dim), np.float32), rng.standard_normal((1024, dim), np.float32)
    tokens = rng.integers(0, vocab, 1024)

    def earlier():
        np.add(dw, be.embedding_backward(g, tokens, vocab), out=dw)

    return medians({"dense grad + add": earlier, "embedding_backward_into": lambda: be.embedding_backward_into(
        dw, g, tokens)}, rounds // 2)


def frozen_classifier(rounds: int, n: int, dim: int, vocab: int) -> dict:
    be = get_backend("numpy")
    rng = np.random.default_rng(0)
    h, w = rng.standard_normal((n, dim), np.float32), rng.standard_normal((vocab, dim), np.float32) * 0.05
    targets = rng.integers(0, vocab, n)
    blocks = cpu_jit.VOCAB_BLOCK

    def run(block):
        cpu_jit.VOCAB_BLOCK = block
        try:
            be.classifier_cross_entropy(h, w, targets, n, need_dw=False)
        finally:
            cpu_jit.VOCAB_BLOCK = blocks

    return medians({"one (n, V) buffer": lambda: run(vocab), f"blocks of {blocks}": lambda: run(blocks)},
                   max(3, rounds // 3))


def attention(rounds: int, batch: int, heads: int, kv_heads: int, head_dim: int, seq: int = 256) -> dict:
    be = get_backend("numpy")
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((batch, seq, (heads + 2 * kv_heads) * head_dim), np.float32)
    dy = rng.standard_normal((batch, seq, heads * head_dim), np.float32)
    cos, sin = rope_tables(seq, head_dim, 10000.0)

    def run(block):
        y, saved = be.attention_forward(qkv, heads, kv_heads, cos, sin, block)
        be.attention_backward(dy, saved, heads, kv_heads)

    return medians({f"blocks of {ATTENTION_BLOCK}": lambda: run(ATTENTION_BLOCK),
                    f"blocks of {query_block(seq)}": lambda: run(None)}, rounds)


PARTS = {
    "optimizer": lambda r: [("optimizer tail, stories15M", optimizer_tail(r))],
    "lora": lambda r: [("LoRA rank-8 adds, one fused qkv (3 parts) + its dx", lora_adds(r))],
    "embedding": lambda r: [("tied embedding grad, V 32000 C 288", tied_embedding_grad(r, 32000, 288)),
                            ("tied embedding grad, V 49152 C 576", tied_embedding_grad(r, 49152, 576))],
    "classifier": lambda r: [("frozen classifier, 1024 x (32000, 288)", frozen_classifier(r, 1024, 288, 32000)),
                             ("frozen classifier, 512 x (49152, 576)", frozen_classifier(r, 512, 576, 49152))],
    "attention": lambda r: [("attention, stories15M slice", attention(r, 4, 6, 6, 48)),
                            ("attention, stories110M slice", attention(r, 2, 12, 12, 64)),
                            ("attention, SmolLM2-135M slice", attention(r, 2, 9, 3, 64))],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--only", choices=list(PARTS), help="one part (default: all)")
    args = p.parse_args()
    for title, result in (row for part in ([args.only] if args.only else PARTS) for row in PARTS[part](args.rounds)):
        (a, ta), (b, tb) = result.items()
        print(f"{title}: {a} {ta * 1e3:.2f} ms, {b} {tb * 1e3:.2f} ms ({tb / ta:.2f}x)")


if __name__ == "__main__":
    main()
