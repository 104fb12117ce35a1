"""pytest fixtures: the backends the semantic tests run on (``helpers.Backend``).

* ``backend``       -- each of ``numpy`` (the NumPy backend on pure NumPy), ``numba`` (the NumPy
  backend on its compiled CPU kernels; skips without numba), ``harness`` (the CUDA kernels on
  the CPU) and ``cupy`` (a real GPU; skips without one).
* ``numpy_backend`` -- the NumPy backend only, on either of its CPU kernels.
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


@pytest.fixture(params=['numpy', 'numba', 'harness', 'cupy'])
def backend(request):
    return Backend(request.param)


@pytest.fixture(params=['numpy', 'numba'])
def numpy_backend(request):
    return Backend(request.param)
