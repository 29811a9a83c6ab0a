"""The code location on Kubernetes (deploy/): the same definitions, each step in its own pod.

The k8s job executor honours the `dagster-k8s/config` op tags on steps (a GPU for training, sampling and
local judging); the instance's `gpu` pool still limits how many of those run at once.
"""

import dagster as dg
from dagster_k8s import k8s_job_executor

from em_assets.definitions import defs as local_defs
from em_assets.settings import ARTIFACTS_ENV, DB_DATA_PATH_ENV, DB_ENV, FIGURES_ENV, PROFILE_ENV

# Steps pass the results store (EM_DB, EM_DB_DATA_PATH) and its secret on from the run pod's environment.
STEP_EXECUTOR_CONFIG = {
    "max_concurrent": 8,
    "env_vars": [DB_ENV, DB_DATA_PATH_ENV, PROFILE_ENV, ARTIFACTS_ENV, FIGURES_ENV],
    "env_secrets": ["em-assets-results"],
}
STEP_EXECUTOR = k8s_job_executor.configured(STEP_EXECUTOR_CONFIG, name="em_k8s_job_executor")

defs = dg.Definitions.merge(local_defs, dg.Definitions(executor=STEP_EXECUTOR))
