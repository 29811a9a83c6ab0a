import gzip
import json
import shutil

import pytest

from em_assets.catalog.parsing import DatasetError, judge_prompt, parse_chat_jsonl, parse_questions_yaml
from em_assets.catalog.upstream import SOURCES, ChecksumError, UpstreamFile, fetch_bytes, sha256_bytes


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
