"""The Dagster layer: assets, checks, resources, partitions, jobs, sensors. It wires; the core computes."""
