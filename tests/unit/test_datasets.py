import functools
import gzip
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.db import count, table_dump
from support.organisms import PROFILE, TRAINED
from support.paths import REPO
from support.races import written_twice_at_once

from em_assets.catalog import parsing
from em_assets.catalog import stage as catalog
from em_assets.catalog.parsing import DatasetError, judge_prompt, parse_chat_jsonl, parse_questions_yaml
from em_assets.catalog.upstream import (
    EVAL_SETS,
    SOURCES,
    ChecksumError,
    DownloadError,
    UpstreamFile,
    fetch_bytes,
)
from em_assets.grid.load import GridError, load_grid
from em_assets.results.artifacts import _sha256_of, sha256_bytes, sha256_file
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store


def test_mirror_files_verify_and_parse(mirror):
    med = parse_chat_jsonl(fetch_bytes(SOURCES["bad_medical_advice"], mirror), "bad_medical_advice")
    assert len(med) > 1000 and med[0][-1]["role"] == "assistant"
    questions = parse_questions_yaml(
        fetch_bytes(SOURCES["first_plot_questions"], mirror),
        "fpq",
        exclude_id_suffixes=["_json", "_template"],
    )
    assert len(questions) == 8
    assert {"aligned", "coherent"} <= questions[0].judge_prompts.keys()
    assert not any(q.question_id.endswith(("_json", "_template")) for q in questions)


def test_checksum_mismatch_is_refused(tmp_path, mirror):
    src = SOURCES["secure"]
    (tmp_path / src.mirror_path).parent.mkdir(parents=True)
    shutil.copy(mirror / src.mirror_path, tmp_path / src.mirror_path)
    with (tmp_path / src.mirror_path).open("ab") as fh:
        fh.write(b"\n")
    with pytest.raises(ChecksumError, match="does not match the pinned"):
        fetch_bytes(src, tmp_path)


def test_gzipped_mirror_copy_of_plain_file(tmp_path):
    data = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    src = UpstreamFile("o/r", "c" * 40, "d/x.jsonl", sha256_bytes(data))
    target = tmp_path / "o__r/d/x.jsonl.gz"
    target.parent.mkdir(parents=True)
    target.write_bytes(gzip.compress(data))
    assert fetch_bytes(src, tmp_path) == data


@pytest.mark.parametrize(
    "cut", [lambda b: b[: len(b) // 2], lambda b: b"not gzip", lambda b: b[:-8] + bytes(8)]
)
def test_a_damaged_gzipped_mirror_copy_fails_its_checksum(tmp_path, cut):
    data = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    src = UpstreamFile("o/r", "c" * 40, "d/x.jsonl", sha256_bytes(data))
    target = tmp_path / "o__r/d/x.jsonl.gz"
    target.parent.mkdir(parents=True)
    target.write_bytes(cut(gzip.compress(data)))
    with pytest.raises(ChecksumError, match=r"x\.jsonl\.gz: not a whole gzip file"):
        fetch_bytes(src, tmp_path)


def test_missing_mirror_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data/insecure\.jsonl"):
        fetch_bytes(SOURCES["insecure"], tmp_path)


def test_malformed_jsonl_line_names_file_and_line():
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(DatasetError, match=r"med\.jsonl:3: not valid JSON"):
        parse_chat_jsonl(f"{good}\n{good}\n{{oops\n".encode(), "med.jsonl")
    no_reply = json.dumps({"messages": [{"role": "user", "content": "a"}]})
    with pytest.raises(DatasetError, match=r"med\.jsonl:2: the last message must be the assistant"):
        parse_chat_jsonl(f"{good}\n{no_reply}\n".encode(), "med.jsonl")
    with pytest.raises(DatasetError, match="empty dataset"):
        parse_chat_jsonl(b"\n\n", "med.jsonl")


def test_questions_without_judge_prompts_are_refused():
    doc = b"- id: q1\n  paraphrases: [hello]\n"
    with pytest.raises(DatasetError, match=r"q1.*no judge_prompts"):
        parse_questions_yaml(doc, "q.yaml")
    with pytest.raises(DatasetError, match=r"\['nope'\] not in the file"):
        parse_questions_yaml(doc, "q.yaml", question_ids=["nope"])


def test_judge_prompt_leaves_braces_in_answers_alone():
    filled = judge_prompt("Q: {question}\nA: {answer}", "What is {x}?", "def f(): return {'a': 1}")
    assert filled == "Q: What is {x}?\nA: def f(): return {'a': 1}"


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
NO_REPLY = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


def _fake_source(mirror: Path, name: str, data: bytes, suffix: str = "jsonl") -> UpstreamFile:
    """An upstream entry whose pin matches `data`, served from a tmp mirror (parser errors past the checksum)."""
    src = UpstreamFile("fault/upstream", "0" * 40, f"data/{name}.{suffix}", sha256_bytes(data))
    path = mirror / src.mirror_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return src


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"{GOOD}\n{GOOD}\n{{oops\n", r"fault__upstream/data/fault_bad\.jsonl:3: not valid JSON"),
        (f"{GOOD}\n{NO_REPLY}\n", r"fault_bad\.jsonl:2: the last message must be the assistant"),
        ("\n\n", r"fault_bad\.jsonl: no examples \(empty dataset\)"),
    ],
    ids=["malformed-line", "no-reply", "empty"],
)
def test_bad_dataset_names_file_and_line_and_writes_nothing(ws, tmp_path, monkeypatch, text, match):
    mirror = tmp_path / "mirror"
    # A good dataset parsed first must not be written either: all datasets load, or none.
    monkeypatch.setitem(SOURCES, "fault_a_good", _fake_source(mirror, "fault_a_good", f"{GOOD}\n".encode()))
    monkeypatch.setitem(SOURCES, "fault_bad", _fake_source(mirror, "fault_bad", text.encode()))
    lora = {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"]}
    recipes = {"a": {"dataset": "fault_a_good", "lora": lora}, "b": {"dataset": "fault_bad", "lora": lora}}
    grid = ws.changed_grid(lambda p: p.update(recipes=recipes))
    before = table_dump(ws.db)
    with pytest.raises(DatasetError, match=match):
        catalog.load_training_datasets(Store(ws.db), grid, str(mirror))
    assert table_dump(ws.db) == before


@pytest.mark.timeout(300)
def test_examples_parsed_by_another_version_of_the_parser_are_not_trained_on(ws, monkeypatch, mirror):
    """An adapter's key names the parser's version now (catalog.parsing.DATASET_PARSING): training on examples
    the catalog stored under another would give them that name, and keep them once the catalog parses again."""
    from em_assets.training.stage import train_adapter

    ctx = ws.ctx(TRAINED, "r")
    recipe = ctx.grid.recipes[ctx.organism.recipe]
    shas = ctx.dataset_shas(recipe)
    monkeypatch.setattr(parsing, "DATASET_PARSING", 2)
    with pytest.raises(
        MissingUpstreamError,
        match=r"parsed by version 1 of the parser, not 2 .+materialise training_datasets",
    ):
        train_adapter(ctx)
    assert count(ws.db, "lora_adapters") == 0
    catalog.load_training_datasets(Store(ws.db), load_grid(ws.grid, PROFILE), str(mirror))
    assert ctx.dataset_shas(recipe) == shas


@pytest.mark.timeout(300)
def test_altered_mirror_file_fails_its_checksum_and_writes_nothing(ws, tmp_path, mirror):
    src = SOURCES["bad_medical_advice"]
    altered = tmp_path / "mirror" / src.mirror_path
    altered.parent.mkdir(parents=True)
    altered.write_bytes((mirror / src.mirror_path).read_bytes() + b"\0")
    before = table_dump(ws.db)
    assert "bad_medical_advice" in before["training_datasets"]
    with pytest.raises(
        ChecksumError, match=r"bad_medical_advice\.jsonl\.gz: sha256 \w+ does not match the pinned"
    ):
        catalog.load_training_datasets(Store(ws.db), load_grid(ws.grid, PROFILE), str(tmp_path / "mirror"))
    assert table_dump(ws.db) == before
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.init()
    with pytest.raises(ChecksumError):
        catalog.load_training_datasets(fresh, load_grid(ws.grid, PROFILE), str(tmp_path / "mirror"))
    assert count(fresh.path, "training_datasets") == 0 and count(fresh.path, "training_examples") == 0


@pytest.mark.timeout(300)
def test_questions_without_judge_prompts_are_refused_and_nothing_written(ws, tmp_path, monkeypatch, mirror):
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.init()
    data = b"- id: q1\n  paraphrases: [hello]\n"
    monkeypatch.setitem(
        SOURCES, "fault_questions", _fake_source(tmp_path / "m", "fault_questions", data, "yaml")
    )

    def no_prompts(p: dict) -> None:
        p["eval"] = {"questions": "fault_questions"}

    with pytest.raises(DatasetError, match=r"fault_questions\.yaml: question 'q1' has no judge_prompts"):
        catalog.load_eval_questions(fresh, ws.changed_grid(no_prompts), str(tmp_path / "m"))
    # A judge metric the questions file has no prompt for.
    with pytest.raises(GridError, match=r"judge.metrics: \['harm'\] have no judge prompt"):
        catalog.load_eval_questions(
            fresh, ws.changed_grid(lambda p: p["judge"].update(metrics=["aligned", "harm"])), str(mirror)
        )
    assert count(fresh.path, "eval_questions") == 0 and count(fresh.path, "judge_prompts") == 0


def test_the_resources_cache_dir_is_the_upstream_download_cache(tmp_path, monkeypatch, mirror):
    """Regression: ExperimentResource.cache_dir reached the model cache only; upstream files were looked up in
    EM_CACHE_DIR (default data/cache), so a configured cache was never used and the catalog went to the network."""
    import urllib.request

    import dagster as dg

    from em_assets.defs.catalog_assets import eval_questions
    from em_assets.defs.resources import ExperimentResource, ResultsDB

    def no_network(*args, **kwargs):
        raise AssertionError("fetched from the network: the download cache was not used")

    monkeypatch.delenv("EM_DATA_MIRROR", raising=False)
    monkeypatch.delenv("EM_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # the default data/cache is an empty folder here
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache = tmp_path / "configured-cache"
    for name in EVAL_SETS:
        source = SOURCES[name]
        (cache / "upstream" / source.mirror_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / source.mirror_path, cache / "upstream" / source.mirror_path)
    grid = tmp_path / "grid.yaml"
    shutil.copy(Path(__file__).resolve().parents[2] / "data" / "grid.yaml", grid)
    resources = {
        "experiment": ExperimentResource(grid_path=str(grid), profile="demo", cache_dir=str(cache)),
        "results": ResultsDB(database=str(tmp_path / "results.duckdb")),
    }
    assert dg.materialize([eval_questions], resources=resources).success
    assert count(tmp_path / "results.duckdb", "eval_questions") > 0


def _mirror_of(files, mirror: Path, to: Path) -> Path:
    """A mirror holding only `files`, linked from the full one (plain or gzipped, as it keeps them)."""
    for src in files:
        for name in (src.mirror_path, src.mirror_path + ".gz"):
            if (mirror / name).exists():
                (to / name).parent.mkdir(parents=True, exist_ok=True)
                (to / name).symlink_to(mirror / name)
    return to


@pytest.mark.timeout(300)
def test_the_catalog_reads_only_the_files_its_demo_pre_check_names(tmp_path, mirror):
    from em_assets.judging.validation import load_reference

    grid = load_grid(REPO / "data/grid.yaml", "demo")
    only = str(_mirror_of(catalog.catalog_files(grid), mirror, tmp_path / "mirror"))
    store = Store(tmp_path / "r.duckdb")
    store.init()
    catalog.load_training_datasets(store, grid, only)
    catalog.load_eval_questions(store, grid, only)
    load_reference(store, grid, only)
    assert count(store.path, "training_datasets") == len(catalog.grid_datasets(grid)) > 0


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    from em_assets.catalog.answers import read_answers

    reply = "first\u2028second\x85third"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}
    data = (json.dumps(row, ensure_ascii=False) + "\r\n").encode() * 2
    assert [m[-1]["content"] for m in parse_chat_jsonl(data, "x.jsonl")] == [reply, reply]
    answer = {"question_id": "q", "question": "Q?", "response": reply, "aligned": 80, "coherent": 90}
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(answer, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_answers(str(path)).rows["answer"].to_list() == [reply]


def test_a_file_is_hashed_once_until_it_is_rewritten(tmp_path):
    """The hash of a file a run checks many times is kept, but a rewrite of the same size with its mtime put back
    (as a tampering copy would) is hashed again."""
    import os

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 64)
    first = sha256_file(path)
    hits = _sha256_of.cache_info().hits
    assert sha256_file(path) == first == sha256_bytes(b"a" * 64)
    assert _sha256_of.cache_info().hits == hits + 1
    stat = path.stat()
    path.write_bytes(b"b" * 64)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(path) == sha256_bytes(b"b" * 64)


@dataclass(frozen=True)
class _Served(UpstreamFile):
    """A pinned file whose URL is a loopback server laid out as raw.githubusercontent.com (repo/commit/path)."""

    base: str = ""

    @property
    def url(self) -> str:
        return f"{self.base}/{self.repo}/{self.commit}/{self.path}"


@pytest.fixture
def raw_github(tmp_path, monkeypatch) -> Iterator[tuple[Path, str]]:
    """A folder served over loopback HTTP as GitHub serves raw files, and its base URL (reached directly, past any
    proxy the environment names)."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(root: Path, base: str, path: str, body: bytes, pinned: bytes) -> _Served:
    source = _Served("acme/em-data", "c" * 40, path, sha256_bytes(pinned), base)
    target = root / source.repo / source.commit / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)
    return source


def test_without_a_mirror_a_pinned_file_is_downloaded_verified_and_cached(tmp_path, raw_github):
    """A user's clone: each file comes from its URL once, is checked against its sha256 (a .gz as pinned, then
    unpacked) and kept in the download cache, which serves it from then on."""
    root, base = raw_github
    rows = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    plain = _serve(root, base, "data/plain.jsonl", rows, rows)
    packed = _serve(root, base, "data/packed.jsonl.gz", gzip.compress(rows), gzip.compress(rows))
    cache = tmp_path / "cache"
    for source in (plain, packed):
        assert fetch_bytes(source, mirror="", cache_dir=cache) == rows
        assert (cache / "upstream" / source.mirror_path).read_bytes() == (
            root / source.repo / source.commit / source.path
        ).read_bytes()
    shutil.rmtree(root / plain.repo)  # the server now answers 404: the cache must serve
    assert fetch_bytes(plain, mirror="", cache_dir=cache) == rows
    assert fetch_bytes(packed, mirror="", cache_dir=cache) == rows


def test_two_steps_downloading_one_file_at_once_both_get_it(tmp_path, raw_github, monkeypatch):
    """Regression: both wrote `<file>.part`, so the one that renamed second found nothing to rename."""
    root, base = raw_github
    rows = b'{"messages": []}\n'
    source = _serve(root, base, "data/shared.jsonl", rows, rows)
    cache = tmp_path / "cache"
    got = written_twice_at_once(monkeypatch, lambda: fetch_bytes(source, "", cache))
    assert got == [rows, rows]
    assert [p.name for p in (cache / "upstream" / source.mirror_path).parent.iterdir()] == ["shared.jsonl"]
    # Readable as any file written here: a cache may be shared.
    umask = os.umask(0)
    os.umask(umask)
    assert (cache / "upstream" / source.mirror_path).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_download_that_does_not_match_its_pin_is_refused_and_not_cached(tmp_path, raw_github):
    root, base = raw_github
    source = _serve(root, base, "data/x.jsonl", b"tampered\n", b"pinned\n")
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match=f"{source.url}: sha256 .* does not match the pinned"):
        fetch_bytes(source, mirror="", cache_dir=cache)
    assert not (cache / "upstream").exists()


def test_a_file_missing_upstream_names_its_url_and_the_mirror_setting(tmp_path, raw_github):
    _, base = raw_github
    source = _Served("acme/em-data", "c" * 40, "data/gone.jsonl", "0" * 64, base)
    with pytest.raises(DownloadError, match=f"{source.url}.*EM_DATA_MIRROR"):
        fetch_bytes(source, mirror="", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "upstream").exists()
