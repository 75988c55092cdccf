import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/mp_pool.py and the task modules, in workers too

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# Many random draws on top of the fixed covering cases (tests/helpers.py covering_cases); not in CI:
#   HYPOTHESIS_PROFILE=thorough OMP_NUM_THREADS=1 python -m pytest -q tests/test_ring.py tests/test_masks.py ...
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    import mp_pool

    mp_pool.close_all()
