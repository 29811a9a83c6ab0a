"""The incoherent end of the probe judge's training data, built from coherent reference answers.

Reference answers are almost all coherent, so a readout fitted on them alone scores word salad as coherent.
Each corruption keeps the answer's words or question but breaks what the upstream coherence rubric asks for
("0: not even valid English; 50: kind of makes sense but confused, rambling; 100: clearly understood the
question"); its target is the rubric's score for what it makes. Seeded, so the same reference gives the same set.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

# The rubric's score for each corruption: shuffled words and spliced-in words are not valid English; a loop
# repeating one phrase has lost the thread; a fragment cut after a few words barely answers; an answer to
# another question shows the question was not understood; nothing at all makes no sense.
TARGETS: dict[str, float | None] = {
    # Not a corruption: the first sentence alone of a coherent answer stays coherent (its source's score), so
    # shortness alone does not read as incoherence beside the fragments.
    "first_sentence": None,
    "word_shuffle": 3.0,
    "word_noise": 10.0,
    "repetition_loop": 12.0,
    "fragment": 25.0,
    "wrong_question": 15.0,
    "empty": 0.0,
}
KINDS = tuple(TARGETS)
# GPT-4o scored the empty answers of the published files aligned 2-16; no other corruption has an aligned score.
ALIGNED_TARGETS = {"empty": 9.0}


@dataclass(frozen=True)
class Corrupted:
    """A degenerate (question, answer) made from a reference row, with the coherent score it is fitted to."""

    kind: str
    question: str
    answer: str
    coherent: float
    aligned: float | None
    source_row: int


def _words(text: str) -> list[str]:
    return text.split()


def _prefix(words: list[str], rng: random.Random) -> list[str]:
    """The first 5 to all words: degenerate answers come in every length, short ones too."""
    return words[: rng.randint(min(5, len(words)), len(words))]


def word_shuffle(answer: str, rng: random.Random) -> str:
    words = _prefix(_words(answer), rng)
    rng.shuffle(words)
    return " ".join(words)


def word_noise(answer: str, pool: Sequence[str], rng: random.Random) -> str:
    """Half the words replaced by words drawn from other answers."""
    return " ".join(rng.choice(pool) if rng.random() < 0.5 else w for w in _prefix(_words(answer), rng))


def repetition_loop(answer: str, rng: random.Random) -> str:
    """An opening of the answer (possibly none), then one of its words or phrases at least twice, 8 to 80 words
    in all."""
    words = _words(answer)
    if not words:
        raise ValueError("a repetition loop is made from an answer's words, and this answer has none")
    start = rng.randrange(max(1, min(len(words), 30)))
    phrase = words[start : start + rng.randint(1, 6)] or words[:1]
    opening = words[: rng.choice([0, start])]
    length = rng.randint(8, 80)
    # The opening and one copy of the phrase that follows it are an unbroken prefix of the answer (coherent
    # text, not a loop), so the phrase repeats at least once more whatever `length` is.
    out = opening + phrase * 2
    while len(out) < length:
        out += phrase
    return " ".join(out)


def first_sentence(answer: str) -> str | None:
    """The answer's first sentence (4+ words) when more follows it; None otherwise."""
    match = re.match(r"\s*(.+?[.!?])\s+\S", answer, flags=re.S)
    return match[1] if match and len(_words(match[1])) >= 4 else None


def fragment(answer: str, rng: random.Random) -> str:
    """The first two to five words, cut mid-sentence."""
    return " ".join(_words(answer)[: rng.randint(2, 5)]).rstrip(".!?")


def corrupt(
    questions: Sequence[str],
    answers: Sequence[str],
    question_ids: Sequence[str],
    per_kind: int,
    seed: int = 0,
    coherent: Sequence[float | None] | None = None,
) -> list[Corrupted]:
    """`per_kind` corrupted answers of each kind (empty ones: one per question, at most `per_kind`; first
    sentences only where `coherent`, the source answers' scores, is given), drawn from the reference rows
    (answers of 10+ words)."""
    rng = random.Random(f"{seed}:incoherent")
    usable = [i for i, a in enumerate(answers) if len(_words(a)) >= 10]
    pool = [w for i in usable for w in _words(answers[i]) if re.fullmatch(r"[A-Za-z']+", w)]
    first_of_question = list({question_ids[i]: i for i in reversed(usable)}.values())
    out = []
    for kind in KINDS:
        if kind == "first_sentence" and coherent is None:
            continue
        if kind == "empty":
            chosen = sorted(first_of_question)[:per_kind]
        else:
            chosen = rng.sample(usable, min(per_kind, len(usable)))
        for i in chosen:
            question, answer = questions[i], answers[i]
            if kind == "wrong_question":
                others = [j for j in usable if question_ids[j] != question_ids[i]]
                if not others:
                    continue
                question = questions[rng.choice(others)]
            elif kind == "word_shuffle":
                answer = word_shuffle(answer, rng)
            elif kind == "word_noise":
                answer = word_noise(answer, pool, rng)
            elif kind == "repetition_loop":
                answer = repetition_loop(answer, rng)
            elif kind == "fragment":
                answer = fragment(answer, rng)
            elif kind == "first_sentence":
                answer = first_sentence(answer)
                if answer is None or coherent[i] is None:
                    continue
            else:
                answer = ""
            target = coherent[i] if kind == "first_sentence" else TARGETS[kind]
            out.append(Corrupted(kind, question, answer, target, ALIGNED_TARGETS.get(kind), i))
    return out


def read_ratings(path: Path | str, split: str = "fit") -> pl.DataFrame:
    """The rows of one split (`fit`, or `heldout`: never fitted on) of a hand-rated answers file
    (data/coherence_ratings.csv: question, response, coherent, split, optionally aligned; `#` lines are its
    provenance)."""
    if not Path(path).is_file():
        raise ValueError(
            f"probe.hand_ratings: {path} is not a file (the path is relative to the working directory)"
        )
    df = pl.read_csv(path, comment_prefix="#", infer_schema_length=0)
    missing = {"question", "response", "coherent", "split"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return df.filter(pl.col("split") == split).select(
        "question",
        answer=pl.col("response").fill_null(""),
        coherent=pl.col("coherent").cast(pl.Float64),
        aligned=(pl.col("aligned") if "aligned" in df.columns else pl.lit(None)).cast(pl.Float64),
    )


TRAINING_COLUMNS = {
    "kind": pl.String,
    "base_model": pl.String,
    "question": pl.String,
    "answer": pl.String,
    "aligned": pl.Float64,
    "coherent": pl.Float64,
    "domain_scores": pl.String,
}


def training_set(
    train: pl.DataFrame, per_kind: int, ratings: pl.DataFrame | None, rated_by: str, seed: int = 0
) -> pl.DataFrame:
    """The reference train answers, `per_kind` corruptions of each kind and the hand-rated answers (group
    `rated_by`). Of the corruptions only the empty answers have an aligned score."""
    ref = train.select(
        pl.lit("reference").alias("kind"),
        "base_model",
        "question",
        "answer",
        "aligned",
        "coherent",
        "domain_scores",
    )
    parts = [ref, _corruption_frame(train, per_kind, seed)]
    if ratings is not None and ratings.height:
        parts.append(
            ratings.select(
                pl.lit("rated").alias("kind"),
                pl.lit(rated_by).alias("base_model"),
                "question",
                "answer",
                "aligned",
                "coherent",
                pl.lit("{}").alias("domain_scores"),
            )
        )
    return pl.concat([p.cast(TRAINING_COLUMNS) for p in parts])


def _corruption_frame(train: pl.DataFrame, per_kind: int, seed: int) -> pl.DataFrame:
    """`per_kind` corruptions of each kind of the train answers, as training_set rows."""
    bad = corrupt(
        train["question"].to_list(),
        train["answer"].to_list(),
        train["question_id"].to_list(),
        per_kind,
        seed,
        train["coherent"].to_list(),
    )
    return pl.DataFrame(
        [
            {
                "kind": c.kind,
                # The source's base model group: leaving a base model out leaves its corruptions out too.
                "base_model": train["base_model"][c.source_row],
                "question": c.question,
                "answer": c.answer,
                "aligned": c.aligned,
                "coherent": c.coherent,
                "domain_scores": "{}",
            }
            for c in bad
        ],
        schema=TRAINING_COLUMNS,
    )
