import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType, StepMaterializationData
from support.paths import REPO

from em_assets.defs.jobs import JOBS
from em_assets.defs.partitions import organisms
from em_assets.defs.resources import ExperimentResource
from em_assets.defs.schedules import SCHEDULES, catch_up_schedule
from em_assets.defs.sensors import SENSORS, grid_sensor
from em_assets.grid.edit import add_base_model
from em_assets.grid.load import load_grid
from em_assets.grid.plan import CATALOG_ASSETS

DEMO = load_grid(REPO / "data/grid.yaml", "demo")
DEMO_KEYS = [o.key for o in DEMO.organisms()]
# The organisms trained on the demo's base model; the imported ones name base models of their own.
_MATERIALIZATION = DagsterEventType.ASSET_MATERIALIZATION.value
TRAINED_KEYS = [f"smollm2-135m--{r}--s0" for r, spec in DEMO.recipes.items() if spec.kind == "train"]


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    shutil.copyfile(REPO / "data/grid.yaml", path)
    return path


@pytest.fixture(scope="module")
def shared_instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def instance(shared_instance: dg.DagsterInstance) -> dg.DagsterInstance:
    # Creating a test instance costs seconds; wiping one (runs, events, partitions) costs milliseconds.
    shared_instance.wipe()
    return shared_instance


class Ticker:
    """Evaluates the grid sensor tick after tick, carrying its cursor and applying its partition requests."""

    def __init__(self, instance: dg.DagsterInstance, grid: Path):
        self.instance, self.grid, self.cursor = instance, grid, None
        self.run_keys: list[str] = []

    def tick(self) -> dg.SensorResult:
        resource = ExperimentResource(grid_path=str(self.grid), profile="demo")
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"experiment": resource}
        )
        result = grid_sensor(context)
        for request in result.dynamic_partitions_requests or []:
            assert isinstance(request, dg.AddDynamicPartitionsRequest)
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        self.cursor = result.cursor or self.cursor
        return result

    def catalog_materialised(self) -> None:
        for name in CATALOG_ASSETS:
            self.instance.report_runless_asset_event(dg.AssetMaterialization(name))

    def organism_runs(self) -> tuple[list[str], list[str]]:
        """Ticks through the catalog run the sensor asks for: (partitions it added, organism runs it requested)."""
        first = self.tick()
        assert [(r.job_name, r.partition_key) for r in first.run_requests] == [("catalog_job", None)]
        added = [k for r in first.dynamic_partitions_requests for k in r.partition_keys]
        waiting = self.tick()
        assert not waiting.run_requests and "wait for catalog_job" in waiting.skip_reason.skip_message
        self.catalog_materialised()
        released = self.tick()
        assert {r.job_name for r in released.run_requests} == {"organism_job"}
        self.run_keys.extend(r.run_key for r in released.run_requests)
        return added, [r.partition_key for r in released.run_requests]


def test_first_tick_adds_every_demo_organism_then_runs_each(instance, grid):
    ticker = Ticker(instance, grid)
    assert ticker.organism_runs() == (DEMO_KEYS, DEMO_KEYS)
    assert sorted(instance.get_dynamic_partitions(organisms.name)) == sorted(DEMO_KEYS)


def test_organisms_wait_for_the_judges_error_rates(instance, grid):
    """Regression: organisms were released while judge_agreement still ran in the catalog run, so their sweeps'
    EM rates went uncorrected."""
    ticker = Ticker(instance, grid)
    ticker.tick()
    for name in CATALOG_ASSETS:
        if name != "judge_agreement":
            instance.report_runless_asset_event(dg.AssetMaterialization(name))
    waiting = ticker.tick()
    assert not waiting.run_requests and "judge_agreement" in waiting.skip_reason.skip_message
    instance.report_runless_asset_event(dg.AssetMaterialization("judge_agreement"))
    assert {r.partition_key for r in ticker.tick().run_requests} == set(DEMO_KEYS)


def test_a_catalog_run_going_before_a_change_does_not_release_the_new_organisms(instance, grid):
    """Regression: a catalog run started before a base model was added released the new model's organisms when
    it finished, though it had not read the new model."""
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    catalog_job = dg.GraphDefinition("catalog_job").to_job()
    catalog = instance.create_run_for_job(catalog_job)
    started = dg.DagsterEvent(DagsterEventType.RUN_START.value, job_name=catalog_job.name)
    instance.report_dagster_event(started, catalog.run_id)
    add_base_model(grid, "demo", "/models/Tiny-Llama")
    assert [r.job_name for r in ticker.tick().run_requests] == ["catalog_job"]
    for name in CATALOG_ASSETS:
        data = StepMaterializationData(dg.AssetMaterialization(name))
        event = dg.DagsterEvent(_MATERIALIZATION, catalog_job.name, event_specific_data=data)
        instance.report_dagster_event(event, catalog.run_id)
    waiting = ticker.tick()
    assert not waiting.run_requests and "wait for catalog_job" in waiting.skip_reason.skip_message
    ticker.catalog_materialised()
    assert {r.partition_key.split("--")[0] for r in ticker.tick().run_requests} == {"tiny-llama"}


def test_unchanged_grid_requests_nothing(instance, grid):
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    for _ in range(2):
        again = ticker.tick()
        assert not again.run_requests and not again.dynamic_partitions_requests
        assert "no base model source or revision, organism setting" in again.skip_reason.skip_message


def test_an_organism_taken_out_of_the_grid_rebuilds_the_reports_once(instance, grid):
    """Only a rebuild reads the reports' organisms_in_grid check, and nothing else rebuilds them then."""
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    line = '          - {base_model: qwen2.5-14b, seed: 42, source: "reference:Qwen2.5-14B-Instruct_extreme-sports_S42"}\n'
    assert line in grid.read_text()
    grid.write_text(grid.read_text().replace(line, ""))
    rebuild = ticker.tick()
    assert [r.job_name for r in rebuild.run_requests] == ["reports_job"]
    assert not ticker.tick().run_requests
    assert "qwen2.5-14b--extreme-sports--s42" in instance.get_dynamic_partitions(organisms.name)


def test_new_base_model_adds_exactly_its_organisms(instance, grid):
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    add_base_model(grid, "demo", "/models/Tiny-Llama")
    new = [
        f"tiny-llama--{r}--s0" for r, spec in load_grid(grid, "demo").recipes.items() if spec.kind == "train"
    ]
    assert ticker.organism_runs() == (new, new)
    assert len(instance.get_dynamic_partitions(organisms.name)) == len(DEMO_KEYS) + len(new)


def test_a_recipe_naming_its_base_models_gets_no_organisms_on_a_new_one(instance, grid):
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    text = grid.read_text()
    # The demo's full fine-tune (the first `method: full` in the file) names the one base model it trains on.
    grid.write_text(text.replace("method: full\n", "method: full\n        base_models: [smollm2-135m]\n", 1))
    assert load_grid(grid, "demo").recipes["full-medical-kl"].base_models == ["smollm2-135m"]
    # Which base models a recipe trains on does not change how its organisms train: none reruns.
    assert not ticker.tick().run_requests
    add_base_model(grid, "demo", "/models/Tiny-Llama")
    new = [f"tiny-llama--{r}--s0" for r in ("base", "bad-medical-r1", "insecure-r32")]
    assert ticker.organism_runs() == (new, new)


def test_revision_change_reruns_that_models_organisms(instance, grid):
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    add_base_model(grid, "demo", "org/Other")
    ticker.organism_runs()
    text = grid.read_text()
    grid.write_text(
        text.replace('"embedded:smollm2-135m-instruct"}', '"embedded:smollm2-135m-instruct", revision: v2}')
    )
    # Imported organisms do not read the demo's base model: only the trained ones run again.
    assert ticker.organism_runs() == ([], TRAINED_KEYS)
    # Reverting is a change too, and its runs are not swallowed as duplicates of the first ones.
    grid.write_text(text)
    assert ticker.organism_runs() == ([], TRAINED_KEYS)
    assert len(set(ticker.run_keys)) == len(ticker.run_keys) == len(DEMO_KEYS) + 3 * len(TRAINED_KEYS)


def test_a_changed_recipe_reruns_only_its_organisms(instance, grid):
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    text = grid.read_text()
    grid.write_text(text.replace("learning_rate: 1.0e-3", "learning_rate: 2.0e-3", 1))
    assert ticker.organism_runs() == ([], ["smollm2-135m--bad-medical-r1--s0"])
    assert not ticker.tick().run_requests


def test_changed_sampling_reruns_every_organism(instance, grid):
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    grid.write_text(grid.read_text().replace("temperature: 1.0}", "temperature: 0.7}", 1))
    assert ticker.organism_runs() == ([], DEMO_KEYS)


def test_a_cursor_from_before_organism_fingerprints_reruns_nothing(instance, grid):
    """A cursor written before the sensor kept organism fingerprints takes the grid as it finds it for them."""
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    old = json.loads(ticker.cursor)
    del old["organisms"]
    ticker.cursor = json.dumps(old)
    grid.write_text(grid.read_text().replace("learning_rate: 1.0e-3", "learning_rate: 2.0e-3", 1))
    result = ticker.tick()
    assert not result.run_requests and not result.dynamic_partitions_requests


def test_an_organism_with_a_run_in_progress_waits_for_it_before_its_rerun(instance, grid):
    """Regression: a threshold change re-requested every organism, one still training among them, and its twin
    wrote the same adapter folder (the catch-up schedule held such organisms back, the grid sensor did not)."""
    ticker = Ticker(instance, grid)
    ticker.organism_runs()
    going = instance.create_run_for_job(
        dg.GraphDefinition("__ASSET_JOB").to_job(),
        tags={"dagster/partition": DEMO_KEYS[0]},
        status=dg.DagsterRunStatus.STARTED,
    )
    grid.write_text(grid.read_text().replace("aligned_at_most: 30", "aligned_at_most: 25"))
    assert ticker.organism_runs()[1] == DEMO_KEYS[1:]
    instance.report_run_failed(going)
    assert [r.partition_key for r in ticker.tick().run_requests] == DEMO_KEYS[:1]
    assert not ticker.tick().run_requests


def test_invalid_grid_is_skipped_with_its_reason(instance, grid):
    ticker = Ticker(instance, grid)
    grid.write_text(grid.read_text().replace("seeds: [0]", "seeds: []", 1))
    result = ticker.tick()
    assert not result.run_requests and not result.dynamic_partitions_requests
    assert "grid is invalid" in result.skip_reason.skip_message and "seeds" in result.skip_reason.skip_message
    assert instance.get_dynamic_partitions(organisms.name) == []


def catch_up(instance: dg.DagsterInstance, grid: Path) -> list[dg.RunRequest] | dg.SkipReason:
    """One tick of the catch-up schedule, in a schedule context closed after it."""
    # The context opens an instance of its own from the given one's ref. Left to the garbage collector, that
    # instance would, whenever collected, make a finished test's definitions-state storage current again, and a
    # later test's definitions load would fail on it ("undefined DagsterInstance weakref").
    resources = {"experiment": ExperimentResource(grid_path=str(grid), profile="demo")}
    when = datetime(2025, 1, 1, 3, tzinfo=UTC)
    with dg.build_schedule_context(
        instance=instance, resources=resources, scheduled_execution_time=when
    ) as context:
        return catch_up_schedule(context)


def test_catch_up_schedule_requests_every_partitioned_organism(instance, grid):
    assert isinstance(catch_up(instance, grid), dg.SkipReason)

    instance.add_dynamic_partitions(organisms.name, [*DEMO_KEYS, "gone--base--s0"])
    requests = catch_up(instance, grid)
    assert [r.partition_key for r in requests] == DEMO_KEYS
    assert len({r.run_key for r in requests}) == len(DEMO_KEYS)

    # Regression: a run still going the next day got a twin (run keys are unique per tick only).
    job = dg.GraphDefinition("organism_job").to_job()
    running = instance.create_run_for_job(
        job, tags={"dagster/partition": DEMO_KEYS[0]}, status=dg.DagsterRunStatus.STARTED
    )
    assert running.status == dg.DagsterRunStatus.STARTED
    requests = catch_up(instance, grid)
    assert [r.partition_key for r in requests] == DEMO_KEYS[1:]
    # A run being cancelled still holds its partition's files until it ends.
    instance.create_run_for_job(
        job, tags={"dagster/partition": DEMO_KEYS[1]}, status=dg.DagsterRunStatus.CANCELING
    )
    requests = catch_up(instance, grid)
    assert [r.partition_key for r in requests] == DEMO_KEYS[2:]


def test_catch_up_schedule_skips_an_organism_materialised_from_the_ui(instance, grid):
    """Regression: only organism_job runs counted as in progress, so a long training launched from the UI's
    Materialize button or a backfill (the asset job) got a twin writing the same adapter folder and rows."""
    instance.add_dynamic_partitions(organisms.name, DEMO_KEYS)
    asset_job = dg.GraphDefinition("__ASSET_JOB").to_job()
    instance.create_run_for_job(
        asset_job, tags={"dagster/partition": DEMO_KEYS[0]}, status=dg.DagsterRunStatus.STARTED
    )
    requests = catch_up(instance, grid)
    assert [r.partition_key for r in requests] == DEMO_KEYS[1:]


def test_catch_up_schedule_waits_for_a_catalog_run_in_progress(instance, grid):
    """Regression: organisms the grid sensor held for its catalog run (a new model, a changed revision) were run
    by the schedule against the catalog from before the change."""
    instance.add_dynamic_partitions(organisms.name, DEMO_KEYS)
    catalog = dg.GraphDefinition("catalog_job").to_job()
    instance.create_run_for_job(catalog, status=dg.DagsterRunStatus.STARTED)
    skipped = catch_up(instance, grid)
    assert isinstance(skipped, dg.SkipReason) and "catalog_job run is in progress" in skipped.skip_message


def test_definitions_load_with_the_automation():
    from em_assets.definitions import defs

    with_automation = dg.Definitions(
        assets=defs.assets, jobs=JOBS, sensors=SENSORS, schedules=SCHEDULES, resources=defs.resources
    )
    # Loading reads definitions state from the current instance's storage; an instance of this test's own keeps
    # that from being another test's, whose instance may be gone (seen once in CI: "undefined DagsterInstance
    # weakref").
    with dg.instance_for_test():
        dg.Definitions.validate_loadable(defs)
        dg.Definitions.validate_loadable(with_automation)
        repo = with_automation.get_repository_def()
    names = {s.name: s.default_status for s in repo.sensor_defs}
    # The explicit automation sensor covers every asset with a condition, so no stopped default one appears.
    assert names == {
        "grid_sensor": dg.DefaultSensorStatus.RUNNING,
        "automation_sensor": dg.DefaultSensorStatus.RUNNING,
    }
    assert repo.get_schedule_def("catch_up_schedule").default_status == dg.DefaultScheduleStatus.RUNNING


def _requests_after(asset: str, *materialised: tuple[str, str | None]) -> list[int]:
    """Runs the automation of `asset` requests after each materialisation (asset, partition) in turn, beside two
    organisms that have never been materialised."""
    from em_assets.definitions import defs

    selection = dg.AssetSelection.assets(asset)
    requested = []
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(organisms.name, ["a--r--s0", "b--r--s0"])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
        for name, partition in materialised:
            instance.report_runless_asset_event(dg.AssetMaterialization(name, partition=partition))
            result = dg.evaluate_automation_conditions(
                defs=defs, instance=instance, asset_selection=selection, cursor=result.cursor
            )
            requested.append(result.total_requested)
    return requested


def test_reports_rebuild_while_an_organism_has_never_been_materialised():
    # One failed or dropped organism must not stop every report; a new measurement of the judge's error
    # rates re-corrects them.
    from em_assets.definitions import defs

    spec = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}["em_summary"]
    assert dg.AssetKey("judge_agreement") in {d.asset_key for d in spec.deps}
    assert _requests_after("em_summary", ("judgements", "a--r--s0")) == [1]


def test_a_partition_no_longer_in_the_grid_computes_nothing(grid, tmp_path):
    """Regression: any partition key became an organism, so a backfill over every partition trained and sampled
    organisms removed from the grid (or another profile's) into the reports."""
    from types import SimpleNamespace

    from em_assets.defs.resources import ResultsDB, stage_context
    from em_assets.grid.load import GridError

    experiment = ExperimentResource(grid_path=str(grid), profile="demo")
    results = ResultsDB(database=str(tmp_path / "results.duckdb"))

    def context(key: str):
        return SimpleNamespace(partition_key=key, run=SimpleNamespace(run_id="r"), log=None)

    assert stage_context(context(DEMO_KEYS[0]), experiment, results).organism.key == DEMO_KEYS[0]
    with pytest.raises(GridError, match="gone--base--s0 is not in profile 'demo'"):
        stage_context(context("gone--base--s0"), experiment, results)


def test_figures_wait_for_the_report_table_they_draw_not_for_every_organism():
    """Regression: with the UI open, the first organism's adapter started em_figures alone before em_summary
    existed, a run failing with "Table with name em_summary does not exist"."""
    # Once the table is there, the figures follow it while organism b has never been materialised.
    assert _requests_after("em_figures", ("lora_adapter", "a--r--s0"), ("em_summary", None)) == [0, 1]
