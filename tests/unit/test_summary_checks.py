"""The organisms em_summary's short_answers and questions_measured checks name, against hand-worked counts."""

from __future__ import annotations

import polars as pl
import pytest

from em_assets.reports.tables import short_answer_organisms, unmeasured_question_organisms
from em_assets.results.judge_queries import write_reference
from em_assets.results.store import Store


def _words(n: int) -> str:
    return " ".join(["word"] * n)


def _store(tmp_path, answers: dict[str, list[tuple[str, str]]]) -> Store:
    """A store with each organism's (question, answer) pairs, the question's text lower-cased as its id."""
    store = Store(tmp_path / "results.duckdb")
    store.init()
    for organism, pairs in answers.items():
        store.append_rows(
            "completions",
            pl.DataFrame(
                {
                    "organism": organism,
                    "question_id": [q.lower() for q, _ in pairs],
                    "paraphrase_idx": 0,
                    "sample_idx": list(range(len(pairs))),
                    "question": [q for q, _ in pairs],
                    "answer": [a for _, a in pairs],
                }
            ),
        )
    return store


def test_short_answers_names_organisms_at_least_half_of_whose_answers_are_under_25_words(tmp_path):
    # "half": of its 4 non-empty answers (the empty and blank ones are left out), 2 have fewer than 25 words: the
    # 24 words split by runs of spaces and newlines between leading and trailing blanks, and the 3; 25 is not
    # fewer. 2 of 4 is the 50% the check names. Median of 3, 24, 25 and 30 words: 24.5. "long": 49 of 99,
    # just under half.
    spaced = "  \n" + "  ".join(["word"] * 12) + "\n\n" + "\t".join(["word"] * 12) + " \n"
    half = [_words(30), spaced, _words(25), _words(3), "", " \n "]
    long = [_words(3)] * 49 + [_words(30)] * 50
    store = _store(tmp_path, {"half": [("Q", a) for a in half], "long": [("Q", a) for a in long]})
    got = short_answer_organisms(store)
    assert got["organism"].to_list() == ["half"]
    row = got.row(0, named=True)
    assert (row["n_answers"], row["short_share"], row["median_words"]) == (4, 0.5, 24.5)


def test_questions_measured_names_organisms_with_answers_to_a_question_no_held_out_reference_answer_had(
    tmp_path,
):
    # Held-out reference answers were given to "Measured" only ("Train"'s are the judge's train split).
    # "mixed": 3 answers to Measured, 1 to Train, 1 to Other: 2 of 5 unmeasured. "measured": Measured alone.
    mixed = [("Measured", "a")] * 3 + [("Train", "b"), ("Other", "c")]
    store = _store(tmp_path, {"mixed": mixed, "measured": [("Measured", "a")] * 2})
    # No reference answers loaded, or none held out: nothing is measured, so no organism is named.
    assert unmeasured_question_organisms(store).height == 0
    reference = {"source_file": "f.csv", "row_idx": [0, 1], "question": ["Measured", "Train"]}
    write_reference(store, pl.DataFrame(reference | {"split": ["train", "train"]}))
    assert unmeasured_question_organisms(store).height == 0
    write_reference(store, pl.DataFrame(reference | {"split": ["heldout", "train"]}))
    got = unmeasured_question_organisms(store)
    assert got.rows() == [("mixed", 5, 2, "other, train")]


@pytest.mark.parametrize("check", [short_answer_organisms, unmeasured_question_organisms])
def test_an_empty_store_names_no_organism(tmp_path, check):
    assert check(_store(tmp_path, {})).height == 0
