"""One dynamic partition per organism (base model x recipe x seed); the grid sensor adds keys."""

import dagster as dg

organisms = dg.DynamicPartitionsDefinition(name="organism")
# Dagster keeps an unpartitioned asset check's latest result per asset (partitioned checks are a preview in
# 1.13): each result names its organism.
PER_ORGANISM_CHECK = " The UI shows the latest organism's result; its `organism` entry names which."

# Steps that want an accelerator: one `gpu` pool slot each (limit set in dagster.yaml), and a GPU request
# for dagster-k8s when the run launches on Kubernetes, tolerating the nvidia.com/gpu taint GPU nodes often carry
# (GKE's, and the usual one elsewhere): not every cluster adds the toleration to pods that ask for a GPU.
GPU_POOL = "gpu"
GPU_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        },
    },
    "em-assets/compute": "gpu",
}
CPU_OP_TAGS = {"em-assets/compute": "cpu"}

# Reports over every organism rebuild when any organism's upstream changes, including while some organism has
# never been materialised (eager() waits for all: one failed or dropped organism would stop every report). A
# report read by another is still waited for: em_figures drawn before em_summary exists would only fail.
REPORT_AUTOMATION = dg.AutomationCondition.eager().without(
    ~dg.AutomationCondition.any_deps_missing()
) & ~dg.AutomationCondition.any_deps_missing().allow(dg.AssetSelection.groups("reports"))
