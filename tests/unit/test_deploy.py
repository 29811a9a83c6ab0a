"""The Kubernetes deployment (deploy/): instance config, run launcher and executor config all parse."""

from __future__ import annotations

import json
import logging
import re
import shutil

import dagster as dg
import dagster_k8s.launcher
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.dagster_run import DagsterRun
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config
from dagster_postgres import DagsterPostgresStorage
from support.paths import REPO

from em_assets.settings import DB_DATA_PATH_ENV

DEPLOY = REPO / "deploy"
PG_ENV = {
    "DAGSTER_PG_HOST": "db",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_USERNAME": "u",
    "DAGSTER_PG_PASSWORD": "p",
}


def test_instance_config_loads_and_its_run_launcher_config_parses(tmp_path, monkeypatch):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    shutil.copy(DEPLOY / "dagster-k8s.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert storage.value["postgres_db"]["hostname"] == "db"
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    parsed = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert parsed.success, parsed.errors
    from em_assets.k8s_definitions import SHARED_ENV

    assert set(SHARED_ENV) <= set(parsed.value["env_vars"])
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert config["python_logs"] == yaml.safe_load((REPO / "dagster.yaml").read_text())["python_logs"]


def _env_reads(config) -> set[str]:
    """The environment variables an instance config reads ({env: NAME} values)."""
    if isinstance(config, dict):
        if set(config) == {"env"}:
            return {config["env"]}
        return set().union(*(_env_reads(v) for v in config.values()))
    if isinstance(config, list):
        return set().union(*(_env_reads(v) for v in config))
    return set()


def test_run_pods_get_every_variable_the_instance_they_load_reads(tmp_path, monkeypatch):
    # The launcher's pods load this instance from its config map: a variable it reads that their pod spec lacks
    # fails every run before it starts. The launching daemon has them all (it loads the same instance).
    from em_assets.k8s_definitions import SHARED_ENV

    for name in [*PG_ENV, *SHARED_ENV]:
        monkeypatch.setenv(name, PG_ENV.get(name, "/data/em-results/x"))
    shutil.copy(DEPLOY / "dagster-k8s.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    parsed = process_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert parsed.success, parsed.errors
    monkeypatch.setattr(dagster_k8s.launcher, "load_kubernetes_config", lambda **_: None)
    launcher = K8sRunLauncher(**parsed.value, k8s_client_batch_api=object(), k8s_client_core_api=object())
    context = launcher.get_container_context_for_run(DagsterRun(job_name="organism_job", run_id="r1"))
    pod = construct_dagster_k8s_job(
        context.get_k8s_job_config("em-assets:0.1.0", launcher),
        args=["dagster", "api", "execute_run"],
        job_name="dagster-run-r1",
        user_defined_k8s_config=context.run_k8s_config,
        component="run_worker",
    ).spec.template.spec
    on_pod = {e.name for e in pod.containers[0].env}
    read = _env_reads(yaml.safe_load((DEPLOY / "dagster-k8s.yaml").read_text()))
    assert "DAGSTER_PG_HOST" in read and read <= on_pod, read - on_pod
    assert set(SHARED_ENV) <= on_pod
    mounts = {m.name: m.mount_path for m in pod.containers[0].volume_mounts}
    assert mounts["em-results"] == "/data/em-results"


def test_the_shipped_instance_keeps_the_progress_our_modules_log(tmp_path):
    # Progress of a long step logged through Python logging (judge agreement's) must reach the run's event log,
    # where the UI and the demo's console read it; INFO is below Python's default level.
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")

    @dg.asset
    def long_step() -> None:
        logging.getLogger("em_assets.judging.agreement_stage").info("judge agreement: scored 1/2")

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        result = dg.materialize([long_step], instance=instance)
        messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert "judge agreement: scored 1/2" in messages


def test_code_location_runs_each_step_with_the_k8s_executor():
    from em_assets.k8s_definitions import STEP_EXECUTOR_CONFIG, defs

    parsed = process_config(k8s_job_executor.config_schema.config_type, STEP_EXECUTOR_CONFIG)
    assert parsed.success, parsed.errors
    job = defs.resolve_job_def("organism_job")
    assert job.executor_def.name == "em_k8s_job_executor"
    gpu_steps = [n for n in job.graph.node_defs if n.pools == {"gpu"}]
    # Read as the executor reads a step's tags: a GPU in the step container's resource limits.
    limits = [get_user_defined_k8s_config(n.tags).container_config["resources"]["limits"] for n in gpu_steps]
    assert gpu_steps and all(limit == {"nvidia.com/gpu": "1"} for limit in limits)


def test_helm_values_point_at_the_code_location_and_the_shared_store():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "em_assets.k8s_definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher" and values["postgresql"]["enabled"]
    assert values["concurrency"]["pools"]["granularity"] == "op"
    env = {e["name"]: e["value"] for e in deployment["env"]}
    launcher_env = dict(v.split("=", 1) for v in values["runLauncher"]["config"]["k8sRunLauncher"]["envVars"])
    assert env[DB_DATA_PATH_ENV] == launcher_env[DB_DATA_PATH_ENV]
    # Every folder a later step's pod reads (artifacts, figures, resolved models) is on the shared volume.
    from em_assets.k8s_definitions import SHARED_ENV

    on_volume = [n for n in SHARED_ENV if n not in ("EM_DB", "EM_PROFILE")]
    assert all(env[n].startswith("/data/em-results/") and launcher_env[n] == env[n] for n in on_volume)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "EXPOSE 3030" in dockerfile and deployment["port"] == 3030
    # The image as built serves the same module (a code server without the Helm values' args, e.g. under
    # deploy/dagster-k8s.yaml, would otherwise run every step in its run's pod, which has no GPU).
    command = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.MULTILINE).group(1))
    assert command[command.index("-m") + 1] == "em_assets.k8s_definitions"
    # The chart's instance keeps our modules' log records as dagster.yaml does.
    logs = yaml.safe_load((REPO / "dagster.yaml").read_text())["python_logs"]
    assert values["pythonLogs"] == {
        "managedPythonLoggers": logs["managed_python_loggers"],
        "pythonLogLevel": logs["python_log_level"],
    }
