"""Shared fixtures: a seeded rng, an isolated GEMM dispatch chain, a quiet tracer, hypothesis budgets."""
import numpy as np
import pytest
from hypothesis import settings

from fusegrad.backends import get_backend
from fusegrad.core.trace import TRACER

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
