"""bitsandbytes' functional module, the NF4 oracle (skipped where it does not import)."""
import warnings

import pytest


@pytest.fixture(scope="module")
def bnbf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.functional")
