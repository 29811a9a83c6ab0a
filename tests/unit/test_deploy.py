"""The Kubernetes deployment (deploy/): instance config, run launcher and executor config all parse."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tomllib
from types import SimpleNamespace

import dagster as dg
import dagster_k8s.launcher
import kubernetes.config
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.dagster_run import DagsterRun
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config
from dagster_postgres import DagsterPostgresStorage
from support.paths import REPO

from em_assets.settings import DB_DATA_PATH_ENV, DB_ENV

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


def test_the_image_has_the_c_compiler_triton_builds_its_cuda_helper_with():
    # python:3.11-slim has none, and vLLM's Triton kernels compile a C module on a GPU pod's first use.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN apt-get update && apt-get install .*\bgcc libc6-dev\b", dockerfile, re.MULTILINE)


def _launcher(config, monkeypatch) -> K8sRunLauncher:
    """The run launcher a pod's instance builds from this launcher config (no cluster is contacted)."""
    parsed = process_config(K8sRunLauncher.config_type(), config)
    assert parsed.success, parsed.errors
    monkeypatch.setattr(dagster_k8s.launcher, "load_kubernetes_config", lambda **_: None)
    return K8sRunLauncher(**parsed.value, k8s_client_batch_api=object(), k8s_client_core_api=object())


def _hand_rolled_launcher(tmp_path, monkeypatch) -> K8sRunLauncher:
    """deploy/dagster-k8s.yaml's launcher, as the daemon and the run pods load it."""
    from em_assets.k8s_definitions import SHARED_ENV

    for name in [*PG_ENV, *SHARED_ENV]:
        monkeypatch.setenv(name, PG_ENV.get(name, "/data/em-results/x"))
    shutil.copy(DEPLOY / "dagster-k8s.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    return _launcher(config["run_launcher"]["config"], monkeypatch)


def _helm_launcher(tmp_path, monkeypatch) -> K8sRunLauncher:
    """The launcher the chart's instance config map writes from deploy/helm/values.yaml, in a run pod's
    environment (which the executor passes on to step pods)."""
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())["runLauncher"]["config"][
        "k8sRunLauncher"
    ]
    for name, value in (v.split("=", 1) for v in values["envVars"]):
        monkeypatch.setenv(name, value)
    config = {
        "service_account_name": "dagster",
        "instance_config_map": "dagster-instance",
        "postgres_password_secret": "dagster-postgresql-secret",
        "job_namespace": "em-assets",
        "env_secrets": [s["name"] for s in values["envSecrets"]],
        "env_vars": values["envVars"],
        "volume_mounts": values["volumeMounts"],
        "volumes": values["volumes"],
        "run_k8s_config": {"container_config": values["runK8sConfig"]["containerConfig"]},
    }
    return _launcher(config, monkeypatch)


def _run_pod(launcher, image: str | None = None):
    """The run pod's spec, as K8sRunLauncher builds it for a code server that reports `image` as its own."""
    context = launcher.get_container_context_for_run(DagsterRun(job_name="organism_job", run_id="r1"))
    return construct_dagster_k8s_job(
        context.get_k8s_job_config(image, launcher),
        args=["dagster", "api", "execute_run"],
        job_name="dagster-run-r1",
        user_defined_k8s_config=context.run_k8s_config,
        component="run_worker",
    ).spec.template.spec


def _step_pod(launcher, op_name: str, monkeypatch, image: str | None = None):
    """A step pod's spec, from the code location's executor as dagster_k8s's step handler merges it (the run
    launcher's config, the executor's, then the op's `dagster-k8s/config` tag) inside a run pod."""
    from em_assets.k8s_definitions import STEP_EXECUTOR_CONFIG, defs

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    parsed = process_config(k8s_job_executor.config_schema.config_type, STEP_EXECUTOR_CONFIG)
    assert parsed.success, parsed.errors
    instance = SimpleNamespace(run_launcher=launcher)
    executor = k8s_job_executor.executor_creation_fn(
        SimpleNamespace(instance=instance, executor_config=parsed.value)
    )
    handler = executor._step_handler
    node = next(n for n in defs.resolve_job_def("organism_job").graph.node_defs if n.name == op_name)
    step = SimpleNamespace(
        execute_step_args=SimpleNamespace(step_keys_to_execute=[op_name]),
        dagster_run=DagsterRun(job_name="organism_job", run_id="r1"),
        instance=instance,
        step_tags={op_name: node.tags},
        get_step_context=lambda _: SimpleNamespace(step=SimpleNamespace(op_name=op_name)),
    )
    context = handler._get_container_context(step)
    # As launch_step: the executor's image, else the launcher's, else the one the code server reports.
    job_config = context.get_k8s_job_config(handler._executor_image, launcher)
    if not job_config.job_image:
        job_config = job_config.with_image(image)
    return construct_dagster_k8s_job(
        job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-r1",
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
    ).spec.template.spec


@pytest.mark.parametrize("deployment", ["hand-rolled", "helm"])
def test_the_results_store_reaches_run_and_step_pods_from_its_secret_only(deployment, tmp_path, monkeypatch):
    # EM_DB holds the catalog's password: a variable named in a launcher's or executor's env_vars is copied by
    # value from the launching pod into the Job spec, readable by whoever may read Jobs; the secret's envFrom
    # gives it to the pod without that copy.
    make = _hand_rolled_launcher if deployment == "hand-rolled" else _helm_launcher
    launcher = make(tmp_path, monkeypatch)
    # As a run pod has it, from the secret.
    monkeypatch.setenv(DB_ENV, "ducklake:postgres:dbname=em_results host=db user=u password=hunter2")
    for pod in [_run_pod(launcher, "em-assets:0.1.0"), _step_pod(launcher, "lora_adapter", monkeypatch)]:
        container = pod.containers[0]
        assert not [e.name for e in container.env if e.value and "hunter2" in e.value]
        assert "em-assets-results" in {e.secret_ref.name for e in container.env_from if e.secret_ref}


def test_the_hand_rolled_instance_names_the_image_of_run_and_step_pods(tmp_path, monkeypatch):
    # The chart tells its code server its image (DAGSTER_CURRENT_IMAGE); a code server started as the
    # Dockerfile's CMD reports none, and a pod without one is refused.
    launcher = _hand_rolled_launcher(tmp_path, monkeypatch)
    helm = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())["dagster-user-deployments"]
    image = helm["deployments"][0]["image"]
    expected = f"{image['repository']}:{image['tag']}"
    assert _run_pod(launcher).containers[0].image == expected
    assert _step_pod(launcher, "lora_adapter", monkeypatch).containers[0].image == expected


def test_gpu_steps_ask_for_a_gpu_and_tolerate_the_gpu_taint(tmp_path, monkeypatch):
    launcher = _helm_launcher(tmp_path, monkeypatch)
    gpu_pod = _step_pod(launcher, "lora_adapter", monkeypatch, "em-assets:0.1.0")
    cpu_pod = _step_pod(launcher, "lora_trajectory", monkeypatch, "em-assets:0.1.0")
    taint = ("nvidia.com/gpu", "Exists", "NoSchedule")
    assert taint in {(t.key, t.operator, t.effect) for t in gpu_pod.tolerations or []}
    assert not cpu_pod.tolerations
    # The run launcher's runK8sConfig reaches every step pod too: it may request, never limit, what a step uses.
    gpu, cpu, run = (pod.containers[0].resources for pod in [gpu_pod, cpu_pod, _run_pod(launcher)])
    assert gpu.limits == {"nvidia.com/gpu": "1"} and not cpu.limits
    assert gpu.requests == cpu.requests == run.requests


def test_the_helm_instance_monitors_runs_as_the_hand_rolled_one_does():
    # Without free_slots_after_run_end_seconds a run lost with its node keeps its step's `gpu` pool slot (one in
    # all, by default), and every later GPU step waits for it.
    monitoring = yaml.safe_load((DEPLOY / "dagster-k8s.yaml").read_text())["run_monitoring"]
    helm = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())["dagsterDaemon"]["runMonitoring"]
    camel = {re.sub(r"_(\w)", lambda m: m[1].upper(), key): value for key, value in monitoring.items()}
    assert monitoring["free_slots_after_run_end_seconds"] > 0 and helm == camel


def test_the_helm_commands_install_the_chart_of_the_images_dagster():
    # The chart's versions are Dagster's: without --version helm takes the newest chart, whose webserver and daemon
    # run another Dagster than the code location, on values written for this one.
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    version = next(p.split("==")[1] for p in pins if p.startswith("dagster=="))
    for path in [DEPLOY / "helm" / "values.yaml", REPO / "docs" / "operations.md"]:
        commands = re.findall(r"helm upgrade --install .*", path.read_text())
        assert commands and all(f" --version {version} " in c for c in commands), (path, commands)
