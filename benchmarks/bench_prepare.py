"""`fusegrad prepare` on a TinyStories-shaped corpus: wall time and peak memory per tokenizer, optionally beside
another checkout of fusegrad (the code before a change), each run in its own process, alternating.

    python benchmarks/bench_prepare.py --mb 50 [--tokenizers byte,bpe,sp,llama2c] [--repeats 2]
        [--other /path/to/other/checkout] [--format txt|jsonl.gz|json|dir]

The corpus: stories of 3-12 sentences drawn from CPython's documentation topics (real English; the same corpus
fusegrad trains on by default), written as TinyStoriesV2-GPT4-train.txt is (stories between lines of
<|endoftext|>), as gzipped JSON Lines / a JSON list of {"story": ...} records, or as a folder of a file per
story (which every checkout reads as a document each: the fair comparison of encoding alone). `sp` is a sentencepiece BPE
model of 4096 pieces trained on the first 2 MB with Llama 2's settings (byte fallback, no normalization),
`llama2c` the tokenizer.bin fusegrad exports from it. A checkout that reads only .txt gets the .txt corpus
whatever --format says (and there, each file is one document).
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

RUN = r"""
import os, sys, time, resource
sys.path.insert(0, sys.argv[1])
from fusegrad.data.prepare import prepare
t = time.perf_counter()
kw = {} if sys.argv[5] == "-" else {"text_field": sys.argv[5]}
meta = prepare(sys.argv[2], sys.argv[3], tokenizer=sys.argv[4], vocab_size=4096 if sys.argv[4] == "bpe" else None,
               overwrite=True, **kw)
seconds = time.perf_counter() - t
try:
    peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024
except OSError:  # macOS: ru_maxrss in bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
print(seconds, peak, meta["tokens"], meta["documents"])
"""


def stories(mb: int, seed: int = 0):
    from fusegrad.data import corpus

    sentences = [s.strip() for d in corpus.documents() for s in re.split(r"(?<=[.!?])\s+", d) if 20 < len(s) < 300]
    rng, size = random.Random(seed), 0
    while size < mb << 20:
        story = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 12)))
        size += len(story) + 15
        yield story


def write_corpus(directory, mb, fmt):
    import gzip

    texts = list(stories(mb))
    txt = os.path.join(directory, "TinyStories-shaped.txt")
    with open(txt, "w", encoding="utf-8") as f:
        f.writelines(t + "\n<|endoftext|>\n" for t in texts)
    if fmt == "txt":
        return txt, txt
    if fmt == "dir":  # a story per file: what any checkout reads as one document each
        folder = os.path.join(directory, "stories")
        os.makedirs(folder)
        for i, t in enumerate(texts):
            with open(os.path.join(folder, f"{i:07d}.txt"), "w", encoding="utf-8") as f:
                f.write(t)
        return folder, txt
    path = os.path.join(directory, "stories." + fmt)
    data = "".join(json.dumps({"story": t}) + "\n" for t in texts) if fmt == "jsonl.gz" else \
        json.dumps([{"story": t, "summary": ""} for t in texts])
    with (gzip.open(path, "wt", encoding="utf-8") if fmt == "jsonl.gz" else open(path, "w", encoding="utf-8")) as f:
        f.write(data)
    return path, txt


def make_tokenizers(directory, txt, names):
    paths = {"byte": "byte", "bpe": "bpe"}
    if {"sp", "llama2c"} & set(names):
        import sentencepiece as spm

        from fusegrad.data.tokenizer import Llama2cTokenizer, load_tokenizer

        with open(txt, encoding="utf-8") as f:
            sample = f.read(2 << 20).split("<|endoftext|>")
        model = os.path.join(directory, "sp", "tokenizer.model")
        os.makedirs(os.path.dirname(model))
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_prefix=model[:-len(".model")],
                                       vocab_size=4096, model_type="bpe", byte_fallback=True, minloglevel=2,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False)
        paths["sp"] = model
        os.makedirs(os.path.join(directory, "l2c"))
        Llama2cTokenizer.from_sentencepiece(load_tokenizer(model)).save(os.path.join(directory, "l2c"))
        paths["llama2c"] = os.path.join(directory, "l2c", "tokenizer.bin")
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--tokenizers", default="byte,bpe,sp,llama2c")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--other", default="", help="another fusegrad checkout to run beside this one")
    ap.add_argument("--format", default="txt", choices=["txt", "jsonl.gz", "json", "dir"])
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here} | ({"other": os.path.abspath(args.other)} if args.other else {})
    with tempfile.TemporaryDirectory() as d:
        data, txt = write_corpus(d, args.mb, args.format)
        names = args.tokenizers.split(",")
        toks = make_tokenizers(d, txt, names)
        size = sum(os.path.getsize(os.path.join(data, n)) for n in os.listdir(data)) if os.path.isdir(data) else \
            os.path.getsize(data)
        print(f"corpus: {size / 2 ** 20:.1f} MB {args.format} ({os.path.getsize(txt) / 2 ** 20:.1f} "
              f"MB as text); python {sys.version.split()[0]}, {os.cpu_count()} cores")
        for name in names:
            results = {tree: [] for tree in trees}
            for _ in range(args.repeats):
                for tree, root in trees.items():  # alternating: both see the same machine
                    reads_datasets = os.path.exists(os.path.join(root, "fusegrad", "data", "sources.py"))
                    src, field = (data, "-" if args.format == "dir" else "story") \
                        if args.format == "dir" or (reads_datasets and args.format != "txt") else (txt, "-")
                    out = subprocess.run([sys.executable, "-c", RUN, root, src, os.path.join(d, "out-" + tree),
                                          toks[name], field], capture_output=True, text=True)
                    if out.returncode:
                        print(f"{name} {tree}: failed ({out.returncode}): {out.stderr.strip()[-300:]}")
                        continue
                    results[tree].append([float(x) for x in out.stdout.split()])
            for tree, runs in results.items():
                if runs:
                    s = statistics.median(r[0] for r in runs)
                    print(f"{name:8s} {tree:6s} {s:8.2f} s  peak {max(r[1] for r in runs):7.0f} MB  "
                          f"{int(runs[0][2])} tokens, {int(runs[0][3])} documents  "
                          f"({os.path.getsize(txt) / 2 ** 20 / s:.1f} MB/s; times {[round(r[0], 2) for r in runs]})")


if __name__ == "__main__":
    main()
