"""One dynamic partition per organism (base model x recipe x seed); the grid sensor adds keys."""

import dagster as dg

organisms = dg.DynamicPartitionsDefinition(name="organism")

# Steps that want an accelerator: one `gpu` pool slot each (limit set in dagster.yaml), and a GPU request
# for dagster-k8s when the run launches on Kubernetes.
GPU_POOL = "gpu"
GPU_OP_TAGS = {
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}},
    "em-assets/compute": "gpu",
}
CPU_OP_TAGS = {"em-assets/compute": "cpu"}
