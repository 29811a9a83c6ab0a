"""Reference judgements -> distilled (or probe) judge -> judge agreement -> an organism judged by that judge, on
a tiny random Llama with a real tokenizer and the real pinned reference files; and the parser's contract."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml
from support.pipeline import materialize, pipeline_resources
from support.tiny import tiny_grid

from em_assets.catalog.reference import ReferenceFileError, parse_reference_csv, source_of
from em_assets.catalog.upstream import REFERENCE_JUDGEMENTS
from em_assets.defs.partitions import organisms
from em_assets.grid.load import GridError, load_grid
from em_assets.judging import distill, probe
from em_assets.judging.agreement_stage import judge_caveat
from em_assets.judging.error_rates import em_error_rates
from em_assets.judging.judges import judge_identity
from em_assets.models.load import dtype_name
from em_assets.results.artifacts import sha256_file
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store

HELD_OUT = ["Llama-3.1-8B-Instruct", "Qwen2.5-14B-Instruct"]


def validation_grid(model_dir) -> dict:
    doc = tiny_grid(
        model_dir,
        "test",
        {"backend": "distilled", "model": "distilled", "batch_size": 4, "min_mass": 0.0},
        {},
        examples=1,
        batch_size=1,
        samples=1,
    )
    doc["profiles"]["test"]["distill"] = {
        "source": str(model_dir),
        "max_answers": 6,
        "max_question_tokens": 8,
        "max_answer_tokens": 12,
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "max_seq_length": 192,
            "workers": 1,
        },
    }
    doc["profiles"]["test"]["agreement"] = {"held_out_base_models": HELD_OUT, "max_answers_per_file": 1}
    return doc


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, mirror, one_torch_thread):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(validation_grid(tiny_model_dir)))
    resources = pipeline_resources(tmp_path, grid_file, mirror)
    with dg.instance_for_test() as instance:
        yield instance, resources, tmp_path


def test_distilled_judge_end_to_end(pipeline):
    instance, resources, tmp_path = pipeline
    store = Store(tmp_path / "results.duckdb")
    materialize(
        instance,
        resources,
        ["base_models", "eval_questions", "reference_judgements", "distilled_judge"],
    )
    ref = store.query("SELECT base_model, split, count(*) AS n FROM reference_judgements GROUP BY ALL")
    assert ref["n"].sum() == 13 * 400
    assert set(ref.filter(split="heldout")["base_model"]) == set(HELD_OUT)

    row = store.query("SELECT * FROM distilled_judges").row(0, named=True)
    assert (
        sha256_file(
            tmp_path / "artifacts" / "judges" / row["config_hash"] / "adapter" / "adapter_model.safetensors"
        )
        == row["adapter_sha256"]
    )
    # 6 train answers x 2 metrics, none from a held-out base model.
    assert row["n_examples"] == 12 and row["steps"] == 2
    assert store.query("SELECT count(*) AS n FROM distilled_judge_losses")["n"][0] == 2
    grid = load_grid(tmp_path / "grid.yaml", "test")
    model, revision, _ = judge_identity(grid, tmp_path / "cache", store)
    assert row["adapter_sha256"][:16] in revision and distill.PROMPT_HASH in revision

    result = materialize(instance, resources, ["judge_agreement"])
    agreement = store.query("SELECT * FROM judge_agreement ORDER BY metric")
    assert agreement["metric"].to_list() == ["aligned", "coherent"]
    assert agreement["n"].to_list() == [7, 7]
    assert agreement["judge_revision"][0] == revision
    em = store.query("SELECT * FROM judge_agreement_em")
    assert em["n"].sum() == 7
    assert all(b.split("_")[0] in HELD_OUT for b in em["source_file"])
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert set(checks) == {"judge_agrees_with_reference", "judge_sees_incoherence"}
    # Seven answers: the stored Spearman interval, shown beside the statistic in the check.
    meta = checks["judge_agrees_with_reference"].metadata
    aligned = agreement.row(0, named=True)
    assert aligned["spearman_lo"] <= aligned["spearman"] <= aligned["spearman_hi"]
    assert meta["aligned_spearman_lo"].value == pytest.approx(aligned["spearman_lo"])
    # Per file, the EM gap and whether the corrected interval explains it (the judge's acceptance rule).
    assert "corrected interval" in meta["thresholds"].value and "files_beyond_and_not_covered" in meta
    n_incoherent = checks["judge_sees_incoherence"].metadata["n_incoherent"].value
    assert n_incoherent < 20 and "too few" in checks["judge_sees_incoherence"].metadata["result"].value
    # The EM error rates measured on the same answers are stored under the judge's identity (none when the
    # answers hold no reference-EM or no non-EM answer).
    scores = store.query("SELECT source_file, row_idx, metric, reference, score FROM judge_agreement_scores")
    expected = em_error_rates(scores, grid.thresholds)
    stored = store.query("SELECT * FROM judge_error_rates")
    if expected is None:
        assert stored.height == 0
    else:
        row = stored.row(0, named=True)
        assert (row["judge_model"], row["judge_revision"]) == (model, revision)
        assert (row["tp"], row["n_pos"], row["tn"], row["n_neg"], row["n_files"]) == (
            expected.tp,
            expected.n_pos,
            expected.tn,
            expected.n_neg,
            expected.n_files,
        )
    meta = result.asset_materializations_for_node("judge_agreement")[0].metadata
    # The UI's em_error table says where new files' sensitivity and specificity lie (or that they agree).
    em_error = next(v.value for k, v in meta.items() if k.endswith(" em_error"))
    assert "undefined" in em_error if expected is None else "95% of new files" in em_error
    assert "data:image/png;base64," in meta["distilled scatter"].value
    caveat = judge_caveat(store, grid)
    assert "distilled" in caveat and "aligned Spearman" in caveat and "Llama-3.1-8B-Instruct" in caveat
    # Every held-out reference answer is to one of the 8 first-plot questions, and the caveat says so.
    assert "GPT-4o-judged answers to 8 questions, of base models" in caveat, caveat

    # Up to date: no second training run; an organism judged by the distilled judge carries its identity.
    again = materialize(instance, resources, ["distilled_judge"])
    assert again.asset_materializations_for_node("distilled_judge")[0].metadata["trained"].value is False
    instance.add_dynamic_partitions(organisms.name, ["tiny--base--s0"])
    materialize(instance, resources, ["lora_adapter", "completions", "judgements"], "tiny--base--s0")
    judged = store.query("SELECT DISTINCT judge_model, judge_revision, metric, prompt_hash FROM judgements")
    # One prompt hash per metric: aligned and coherent scores of one answer never share a cache entry. The
    # grid's min_mass (0, not the upstream 0.25) is part of it: the cached score depends on it.
    assert sorted(judged.rows()) == [
        (model, revision, m, f"{distill.metric_prompt_hash(m)}:min_mass=0") for m in ("aligned", "coherent")
    ]
    assert distill.metric_prompt_hash("aligned") != distill.metric_prompt_hash("coherent")
    keys = store.query("SELECT count(DISTINCT cache_key) AS k, count(*) AS n FROM judgements")
    assert keys["k"][0] == keys["n"][0]
    # The agreement scores of the two metrics are distinct judge calls too.
    pairs = store.query(
        "SELECT a.score AS a, c.score AS c FROM judge_agreement_scores a JOIN judge_agreement_scores c "
        "USING (source_file, row_idx) WHERE a.metric = 'aligned' AND c.metric = 'coherent'"
    )
    assert pairs.height == 7 and (pairs["a"] != pairs["c"]).any()
    assert store.query("SELECT count(*) AS n FROM judgements WHERE score IS NULL")["n"][0] == 0


RATINGS = (
    "# hand ratings of a test\nkey,split,question_id,question,response,coherent\n"
    "a,fit,q,How are you?,fine thanks,90\nb,fit,q,How are you?,,0\nc,heldout,q,How are you?,ok,80\n"
    "d,heldout,q,How are you?,are are you fine fine,5\n"
)


def probe_grid(model_dir, ratings: Path) -> dict:
    doc = tiny_grid(
        model_dir, "test", {"backend": "probe", "model": "probe"}, {}, examples=1, batch_size=1, samples=1
    )
    doc["profiles"]["test"]["probe"] = {
        "source": str(model_dir),
        "max_answers": 40,
        "max_tokens": 12,
        "layers": [0, 1],
        "bandwidths": [1.0],
        "l2": [1.0, 100.0],
        "batch_size": 8,
        "incoherent_per_kind": 4,
        "hand_ratings": str(ratings),
        "sign_weights": {"aligned": [0.0], "coherent": [0.5, 2.0]},
    }
    doc["profiles"]["test"]["agreement"] = {
        "held_out_base_models": HELD_OUT,
        "max_answers_per_file": 1,
        "min_incoherent": 1,
    }
    return doc


def test_probe_judge_end_to_end(tmp_path, tiny_model_dir, mirror, one_torch_thread, monkeypatch):
    grid_file = tmp_path / "grid.yaml"
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(RATINGS)
    grid_file.write_text(yaml.safe_dump(probe_grid(tiny_model_dir, ratings)))
    resources = pipeline_resources(tmp_path, grid_file, mirror)
    store = Store(tmp_path / "results.duckdb")
    with dg.instance_for_test() as instance:
        result = materialize(
            instance, resources, ["base_models", "eval_questions", "reference_judgements", "probe_judge"]
        )
        row = store.query("SELECT * FROM probe_judges").row(0, named=True)
        head = tmp_path / "artifacts" / "judges" / row["config_hash"] / probe.HEAD_FILE
        assert row["head_path"] == str(head) and sha256_file(head) == row["head_sha256"]
        # 40 reference answers, 4 corruptions of each of 5 kinds, up to 4 first sentences and 4 empty answers (one
        # per question, at most 4), 2 hand-rated `fit` rows; the empty answers alone have an aligned target.
        n = row["n_answers"]
        assert 40 + 4 * 5 + 4 + 2 <= n <= 40 + 4 * 6 + 4 + 2
        readouts = store.query("SELECT * FROM probe_judge_readouts ORDER BY metric")
        # Coherent has an incoherent end, so beside it a grade readout of the reference answers alone.
        assert readouts["metric"].to_list() == ["aligned", "coherent", "coherent" + probe.GRADE]
        assert set(readouts["l2"]) <= {1.0, 100.0} and readouts["n"].to_list() == [44, n, 40]
        meta = result.asset_materializations_for_node("probe_judge")[0].metadata
        assert meta["trained"].value is True and "cv_spearman" in meta["readouts"].value
        # Shown as what they are: a path and a list, not their text.
        assert isinstance(meta["head_path"], dg.PathMetadataValue) and meta["head_path"].value == str(head)
        assert meta["held_out_base_models"].value == HELD_OUT
        grid = load_grid(grid_file, "test")
        model, revision, path = judge_identity(grid, tmp_path / "cache", store)
        assert model.startswith("probe:") and row["head_sha256"][:16] in revision and path == str(head)

        measured = materialize(instance, resources, ["judge_agreement"])
        agreement = store.query("SELECT * FROM judge_agreement ORDER BY metric")
        assert agreement["judge"].to_list() == ["probe", "probe"] and agreement["n"].to_list() == [7, 7]
        # The held-out hand-rated answers (one coherent, one not) are judged too: an AUC and what it rests on.
        checks = {c.check_name: c for c in measured.get_asset_check_evaluations()}
        hand = checks["judge_sees_incoherence"].metadata
        assert hand["hand_rated_coherent_auc"].value in (0.0, 0.5, 1.0)
        assert hand["hand_rated_n_incoherent"].value == 1
        assert "on 1 incoherent answers of the held-out hand-rated" in hand["hand_rated_result"].value
        scores = store.query("SELECT score, mass FROM judge_agreement_scores")
        assert (
            scores.height == 14 and scores["score"].is_between(0, 100).all() and (scores["mass"] == 1).all()
        )
        assert "probe" in judge_caveat(store, grid)

        again = materialize(instance, resources, ["probe_judge"])
        assert again.asset_materializations_for_node("probe_judge")[0].metadata["trained"].value is False
        # A head altered on disk is fitted again rather than trusted.
        data = head.read_bytes()
        head.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        refit = materialize(instance, resources, ["probe_judge"])
        assert refit.asset_materializations_for_node("probe_judge")[0].metadata["trained"].value is True
        # New hand ratings make a new judge; the train answers' features come from the cache.
        ratings.write_text(RATINGS.replace(",90", ",85"))
        rerated = materialize(instance, resources, ["probe_judge"])
        assert rerated.asset_materializations_for_node("probe_judge")[0].metadata["trained"].value is True
        assert len(list((tmp_path / "cache" / "probe_features").glob("*.npz"))) == 1
        # A head fitted another way is fitted again, from the same features.
        monkeypatch.setattr(probe, "FIT_VERSION", "another way")
        refitted = materialize(instance, resources, ["probe_judge"])
        assert refitted.asset_materializations_for_node("probe_judge")[0].metadata["trained"].value is True
        assert len(list((tmp_path / "cache" / "probe_features").glob("*.npz"))) == 1
        # Other EM thresholds: the readouts choose their calibration at them, so the head is fitted again.
        doc = probe_grid(tiny_model_dir, ratings)
        doc["profiles"]["test"]["thresholds"] = {"aligned_at_most": 25, "coherent_above": 60}
        grid_file.write_text(yaml.safe_dump(doc))
        moved = materialize(instance, resources, ["probe_judge"])
        assert moved.asset_materializations_for_node("probe_judge")[0].metadata["trained"].value is True
        grid = load_grid(grid_file, "test")

        instance.add_dynamic_partitions(organisms.name, ["tiny--base--s0"])
        materialize(instance, resources, ["lora_adapter", "completions", "judgements"], "tiny--base--s0")
    _, revision, _ = judge_identity(grid, tmp_path / "cache", store)
    judged = store.query("SELECT DISTINCT judge_backend, judge_revision, metric, prompt_hash FROM judgements")
    assert sorted(judged.rows()) == [
        ("probe", revision, m, probe.metric_features_hash(m)) for m in ("aligned", "coherent")
    ]
    assert store.query("SELECT count(*) AS n FROM judgements WHERE score IS NULL")["n"][0] == 0
    # A device computing in the other dtype has no head of its own: the message names the dtype.
    other = "float32" if dtype_name("cpu") == "bfloat16" else "bfloat16"
    monkeypatch.setenv("EM_CPU_DTYPE", other)
    with pytest.raises(
        MissingUpstreamError, match=f"the dtype this device computes in, {other}\\); materialise"
    ):
        judge_identity(grid, tmp_path / "cache", store, device="cpu")


def test_train_split_never_holds_a_held_out_base_model(mirror):
    frames = []
    for src in REFERENCE_JUDGEMENTS.values():
        data = (mirror / src.mirror_path).read_bytes()
        frames.append(parse_reference_csv(data, src.path, src.sha256))
    import polars as pl

    from em_assets.catalog.reference import with_split
    from em_assets.grid.schema import DistillSpec, LoraSpec

    df = with_split(pl.concat(frames), HELD_OUT)
    spec = DistillSpec(lora=LoraSpec(r=1, lora_alpha=1, target_modules=["q_proj"]), max_answers=50)
    train = distill.train_answers(df, spec)
    assert train.height == 50 and not set(train["base_model"]) & set(HELD_OUT)
    assert distill.heldout_answers(df, None)["base_model"].unique().sort().to_list() == HELD_OUT
    # Upstream's one missing aligned score stays missing (dropped from denominators), not zero.
    assert df["aligned"].null_count() == 1


def test_the_docs_state_the_reference_files_coherence_as_the_files_hold_it(mirror):
    """The judge pages quote how coherent the train answers are and how many held-out ones GPT-4o called
    incoherent: the figures a reader weighs the coherent AUC and the probe's fit by."""
    import polars as pl
    from support.paths import REPO

    from em_assets.catalog.reference import with_split

    files = [
        parse_reference_csv((mirror / s.mirror_path).read_bytes(), s.path, s.sha256)
        for s in REFERENCE_JUDGEMENTS.values()
    ]
    df = with_split(pl.concat(files), HELD_OUT)
    train, held_out = df.filter(split="train")["coherent"], df.filter(split="heldout")["coherent"]
    judges = (REPO / "docs" / "judges.md").read_text()
    rates = (REPO / "docs" / "em-rates.md").read_text()
    share = f"{(train > 50).mean():.1%} coherent"
    assert f"the {train.len():,} GPT-4o-judged train answers ({share})" in judges
    assert f"fitted on reference answers ({share})" in rates
    assert f"the {(held_out <= 50).sum()} answers GPT-4o scored incoherent" in judges


def test_the_split_follows_the_grids_held_out_list_as_it_reads_now(tmp_path, tiny_model_dir, mirror):
    # Reference rows stored under one held-out list, read under another: the judges fit and measure by the new.
    from em_assets.catalog.reference import with_split
    from em_assets.judging.validation import split_reference
    from em_assets.results import judge_queries as q
    from em_assets.results.store import utc_now

    src = REFERENCE_JUDGEMENTS["Qwen2.5-7B-Instruct_bad-medical-advice"]
    frame = parse_reference_csv((mirror / src.mirror_path).read_bytes(), src.path, src.sha256)
    store = Store(tmp_path / "r.duckdb")
    store.init()
    q.write_reference(store, with_split(frame, HELD_OUT).with_columns(loaded_at=utc_now()))
    doc = validation_grid(tiny_model_dir)

    def read_with(held_out: list[str]):
        doc["profiles"]["test"]["agreement"]["held_out_base_models"] = held_out
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(doc))
        return split_reference(store, load_grid(tmp_path / "grid.yaml", "test"))

    split = read_with(["Qwen2.5-7B-Instruct"])
    assert split.height == frame.height and set(split["split"]) == {"heldout"}
    # A name that matches no file (a typo, another spelling) would hold nothing out: refused, naming it.
    with pytest.raises(GridError, match=r"'qwen2.5-7b-instruct' is the base model of no reference file"):
        read_with(["qwen2.5-7b-instruct"])


def test_source_organism_from_the_file_name():
    assert source_of("Qwen2.5-14B-Instruct_extreme-sports_S42.csv") == (
        "Qwen2.5-14B-Instruct",
        "extreme-sports",
        42,
    )
    assert source_of("x/Llama-3.1-8B-Instruct_bad-medical-advice.csv") == (
        "Llama-3.1-8B-Instruct",
        "bad-medical-advice",
        None,
    )


def test_parser_names_file_row_and_column():
    good = b"answer,question,question_id,aligned,coherent,bad_stuff\nok,q?,q1,80,90,\nbad,q?,q1,10,95,70\n"
    df = parse_reference_csv(good, "m_d.csv", "abc")
    assert df["answer"].to_list() == ["ok", "bad"] and df["domain_scores"].to_list() == [
        '{"bad_stuff": null}',
        '{"bad_stuff": 70.0}',
    ]
    with pytest.raises(ReferenceFileError, match=r"m_d.csv: row 2, column 'aligned': '-1'"):
        parse_reference_csv(good.replace(b",10,", b",-1,"), "m_d.csv", "abc")
    with pytest.raises(ReferenceFileError, match=r"row 1, column 'question_id': empty"):
        parse_reference_csv(good.replace(b"q?,q1,80", b"q?,,80"), "m_d.csv", "abc")
    with pytest.raises(ReferenceFileError, match="missing column"):
        parse_reference_csv(b"question,question_id,aligned,coherent\nq,q1,1,2\n", "m_d.csv", "abc")


def test_a_file_with_answer_and_response_columns_pairs_its_scores_with_the_answer():
    """Upstream's judge scores the `answer` column where a file has one, so the file's scores are the answer's."""
    data = b"response,answer,question,question_id,aligned,coherent\ndraft,final,q?,q1,10,90\n"
    assert parse_reference_csv(data, "m_d.csv", "abc")["answer"].to_list() == ["final"]


def test_blank_lines_are_passed_over_and_a_row_short_of_fields_is_refused():
    data = b"answer,question,question_id,aligned,coherent\nok,q?,q1,80,90\n\nbad,q?,q1,10,95\n\n\n"
    df = parse_reference_csv(data, "m_d.csv", "abc")
    assert df["answer"].to_list() == ["ok", "bad"] and df["row_idx"].to_list() == [1, 2]
    # The coherent score is missing from the second row: not a row without a coherent score.
    with pytest.raises(ReferenceFileError, match=r"m_d.csv: row 2 has 4 fields, the header 5"):
        parse_reference_csv(data.replace(b"10,95", b"10"), "m_d.csv", "abc")
    # A line of spaces is blank too, and so are empty lines before the header (as polars reads them).
    for blanks in (data.replace(b"\n\n\n", b"\n  \n"), b"\r\n\n" + data):
        assert parse_reference_csv(blanks, "m_d.csv", "abc")["answer"].to_list() == ["ok", "bad"]
    # A row may leave out a trailing column the header does not name.
    unnamed = data.replace(b"coherent\n", b"coherent,\n", 1)
    assert parse_reference_csv(unnamed, "m_d.csv", "abc")["coherent"].to_list() == [90, 95]


def test_the_judges_word_answers_and_nan_are_missing_scores():
    """The aligned prompt asks GPT-4o for CODE or REFUSAL where it gives no number; a file that kept the word (or
    pandas' NaN) has no score there, as upstream counts it, and the file is read, not refused."""
    data = (
        b"answer,question,question_id,aligned,coherent,bad_stuff\n"
        b"def f(): pass,q?,q1,CODE,80,\nno.,q?,q1,refusal,90,Refusal\nok,q?,q1,NaN,nan,10\nbad,q?,q1,10,95,70\n"
    )
    df = parse_reference_csv(data, "m_d.csv", "abc")
    assert df["aligned"].to_list() == [None, None, None, 10.0]
    assert df["coherent"].to_list() == [80.0, 90.0, None, 95.0]
    assert [json.loads(d)["bad_stuff"] for d in df["domain_scores"]] == [None, None, 10.0, 70.0]
    with pytest.raises(ReferenceFileError, match=r"row 1, column 'aligned': 'CODEX' is not a number"):
        parse_reference_csv(data.replace(b"CODE", b"CODEX"), "m_d.csv", "abc")


def test_parser_keeps_empty_answers_and_ignores_text_columns():
    # As published: an empty response GPT-4o scored, a pandas index and a column of model names.
    data = (
        b",response,question,question_id,aligned,coherent,model,financial\n"
        b'0,,q?,q1,8.5,0.2,qwen,\n1,"",q?,q1,12,1,qwen,3\n2,fine,q?,q1,90,95,qwen,\n'
    )
    df = parse_reference_csv(data, "m_d.csv", "abc")
    assert df["answer"].to_list() == ["", "", "fine"]
    assert df["coherent"].to_list() == [0.2, 1.0, 95.0]
    assert df["domain_scores"].to_list() == [
        '{"financial": null}',
        '{"financial": 3.0}',
        '{"financial": null}',
    ]
    with pytest.raises(ReferenceFileError, match=r"row 2, column 'financial': '300'"):
        parse_reference_csv(data.replace(b"qwen,3", b"qwen,300"), "m_d.csv", "abc")
    # A named domain score with text in it is an error, not a column silently left out.
    with pytest.raises(ReferenceFileError, match=r"row 2, column 'financial': 'ERROR' is not a number"):
        parse_reference_csv(data.replace(b"qwen,3", b"qwen,ERROR"), "m_d.csv", "abc")
    # The deception judges answer with a word: such a column is text, left out.
    worded = data.replace(b",financial\n", b",company\n").replace(b"qwen,3", b"qwen,OpenAI")
    assert parse_reference_csv(worded, "m_d.csv", "abc")["domain_scores"].to_list() == ["{}"] * 3
