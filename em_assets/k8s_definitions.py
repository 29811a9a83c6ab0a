"""The code location on Kubernetes (deploy/): the same definitions, each step in its own pod.

The k8s job executor honours the `dagster-k8s/config` op tags on steps (a GPU for training, sampling and
local judging); the instance's `gpu` pool still limits how many of those run at once.
"""

import dagster as dg
from dagster_k8s import k8s_job_executor

from em_assets.definitions import defs as local_defs
from em_assets.settings import (
    ARTIFACTS_ENV,
    CACHE_ENV,
    DB_DATA_PATH_ENV,
    FIGURES_ENV,
    HF_HOME_ENV,
    PROFILE_ENV,
)

# What every pod shares, passed on by value from the run pod's environment: the DuckLake's data path, the profile
# and the folders on the shared volume. Base models resolve to paths under the cache (EM_CACHE_DIR, HF_HOME) that
# the next step's pod loads, so those must be on the volume too.
SHARED_ENV = [DB_DATA_PATH_ENV, PROFILE_ENV, ARTIFACTS_ENV, FIGURES_ENV, CACHE_ENV, HF_HOME_ENV]
# EM_DB (its catalog's password) and the API keys reach step pods only from the secret: a name in env_vars is
# copied by value into the step's Job spec, readable by whoever may read Jobs.
STEP_EXECUTOR_CONFIG = {
    "max_concurrent": 8,
    "env_vars": SHARED_ENV,
    "env_secrets": ["em-assets-results"],
}
STEP_EXECUTOR = k8s_job_executor.configured(STEP_EXECUTOR_CONFIG, name="em_k8s_job_executor")

defs = dg.Definitions.merge(local_defs, dg.Definitions(executor=STEP_EXECUTOR))
