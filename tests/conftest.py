"""Shared fixtures: a seeded rng, an isolated GEMM dispatch chain, a quiet tracer, hypothesis budgets, a tiny
sentencepiece model trained on the embedded corpus (well under a second) and texts to tokenize."""
import io

import numpy as np
import pytest
from hypothesis import settings

from fusegrad.backends import get_backend
from fusegrad.core.trace import TRACER
from fusegrad.data import corpus

# few examples per property: the suite must stay fast on 2 shared cores
settings.register_profile("fusegrad", max_examples=10, deadline=None)
settings.load_profile("fusegrad")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def chain():
    """The numpy backend's GEMM chain with no accelerators; restored after the test."""
    chain = get_backend("numpy").chain
    saved = chain.offloads
    chain.offloads = []
    yield chain
    chain.offloads = saved


@pytest.fixture(autouse=True)
def _restore_tracer():
    enabled = TRACER.enabled
    yield
    TRACER.enabled = enabled


@pytest.fixture(scope="session")
def sp_model_proto():
    """Serialized sentencepiece BPE model, Llama 2 settings: <unk> 0, BOS 1, EOS 2, byte fallback, no normalisation."""
    import sentencepiece as spm

    lines = [ln for doc in corpus.documents()[:12] for ln in doc.splitlines() if ln.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=512,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return out.getvalue()


@pytest.fixture(scope="session")
def sp_oracle(sp_model_proto):
    """sentencepiece's own processor for the same model, the oracle to compare against."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_model_proto)
    return sp


@pytest.fixture(scope="session")
def sample_texts():
    """Texts with spaces, newlines and multi-byte characters, plus a long corpus excerpt."""
    return ["Hello world, the assert statement!", "  two  spaces\nand a newline\n", "émoji 🙂 ü ß",
            "for x in range(10):\n    print(x)", "a", corpus.documents()[40][:2000]]
