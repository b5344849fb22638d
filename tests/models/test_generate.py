import numpy as np
import pytest

import fusegrad as fg
from fusegrad.models import Llama
from fusegrad.models.generate import KVCache, forward_cached, generate, sample_token


@pytest.fixture(scope="module")
def model():
    return Llama.from_preset("tiny", seed=3)


def test_kv_cache_logits_equal_the_full_forward(model):
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 20))
    with fg.no_grad():
        full = model.logits(tokens).numpy()[0]  # (T, V)
    cache = KVCache(model.config)
    np.testing.assert_allclose(forward_cached(model, tokens[0, :12], cache), full[11], atol=1e-5)
    for j in range(12, 20):
        np.testing.assert_allclose(forward_cached(model, [tokens[0, j]], cache), full[j], atol=1e-5)
    assert cache.length == 20


def test_greedy_generation_follows_the_argmax_of_the_full_forward(model):
    out = generate(model, [1, 5], max_new_tokens=6, temperature=0.0)
    with fg.no_grad():
        logits = model.logits(np.array([out[:-1]])).numpy()[0]
    assert out[2:] == [int(i) for i in logits[1:].argmax(-1)]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = {sample_token(logits, np.random.default_rng(s), 1.0, top_p=0.7) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never drawn
    a = generate(Llama.from_preset("tiny", seed=1), [1], 10, temperature=1.0, seed=7)
    b = generate(Llama.from_preset("tiny", seed=1), [1], 10, temperature=1.0, seed=7)
    assert a == b


def test_generation_stops_at_the_context_limit_and_checks_ids(model):
    out = generate(model, [1] * 30, max_new_tokens=50, temperature=0.0)
    assert len(out) == model.config.max_seq_len
    with pytest.raises(fg.ShapeError, match="token id 99"):
        generate(model, [1, 99], 3)
    with pytest.raises(fg.ShapeError, match="at least one token"):
        generate(model, [], 3)
