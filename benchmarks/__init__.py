"""Benchmarks beside the product: the comparison harness (`python -m benchmarks.compare`, which `fusegrad bench
--vs torch|peft` and `--ranks N` run), the peers it times against fusegrad (peers.py), the torch reference Llama
that the tests share (torch_llama.py), and kernel micro-benchmarks (bench_*.py)."""
