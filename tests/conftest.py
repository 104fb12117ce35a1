"""pytest fixtures: the backends the semantic tests run on (``helpers.Backend``).

* ``backend``       -- each of ``numpy``, ``harness`` (the CUDA kernels on the CPU) and
  ``cupy`` (a real GPU; skips without one).
* ``numpy_backend`` -- the NumPy backend only.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

from helpers import Backend

# Hypothesis profiles: ``ci`` (the default) keeps the suite within CI's budget; ``long`` is for a
# local hunt: ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_contract.py``.  Tests that set
# their own ``max_examples`` keep it.
settings.register_profile('ci', max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile('long', max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


@pytest.fixture(params=['numpy', 'harness', 'cupy'])
def backend(request):
    return Backend(request.param)


@pytest.fixture
def numpy_backend():
    return Backend('numpy')
