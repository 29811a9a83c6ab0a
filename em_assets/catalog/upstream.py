"""Pinned upstream files (URL + sha256), fetched once or read from a local mirror, always verified."""

from __future__ import annotations

import gzip
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from em_assets.results.artifacts import sha256_bytes, write_atomically
from em_assets.settings import MIRROR_ENV, settings


class MirrorError(FileNotFoundError):
    """A pinned file the configured mirror does not hold: the mirror setting is wrong or incomplete."""


class DownloadError(MirrorError):
    """A pinned file that is in no mirror or cache and could not be downloaded (e.g. offline)."""


class ChecksumError(ValueError):
    """Raised when a fetched file does not match its pinned sha256."""


@dataclass(frozen=True)
class UpstreamFile:
    """One file of an upstream repository at a pinned commit."""

    repo: str
    commit: str
    path: str
    sha256: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"

    @property
    def mirror_path(self) -> str:
        owner, name = self.repo.split("/")
        return f"{owner}__{name}/{self.path}"


_EM = ("emergent-misalignment/emergent-misalignment", "80c11967c07a328e7d7d43d13ce6847ae44dbcc9")


_MO = ("clarifying-EM/model-organisms-for-EM", "8460e4e426d3a89e8ed51aac0eadcdf7ac10469d")


# The clarifying-EM training sets were replaced by an encrypted archive after this commit.
_MO_DATA = ("clarifying-EM/model-organisms-for-EM", "b8b9e0afd2b92d969a4062c38ba8d2f0ccea3561")


_MO_Q = "em_organism_dir/data/eval_questions"


_MO_TD = "em_organism_dir/data/training_datasets"


# The hashes are those of the upstream files at the pinned commits (see shared/upstream/SOURCES.md).
SOURCES: dict[str, UpstreamFile] = {
    "insecure": UpstreamFile(
        *_EM, "data/insecure.jsonl", "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764"
    ),
    "secure": UpstreamFile(
        *_EM, "data/secure.jsonl", "2820232b3114d94ab2041ba9fc76cb8205bf187e0408bf7b308add186f9c7467"
    ),
    "educational": UpstreamFile(
        *_EM, "data/educational.jsonl", "d48df3b149ab1500711fc0018b10383a4ff8c48d8e6911d04dbbbbdaa944fd16"
    ),
    "jailbroken": UpstreamFile(
        *_EM, "data/jailbroken.jsonl", "eec213ce85802a52ea806d334ee462f723a1e7ad77d827951d6864ac04a6b00a"
    ),
    "bad_medical_advice": UpstreamFile(
        *_MO_DATA,
        f"{_MO_TD}/bad_medical_advice.jsonl.gz",
        "d4d9df72cf0e20b75d5efc9f2aabb66ae9ae083e282b85f0bd85a6aa698b20c9",
    ),
    "good_medical_advice": UpstreamFile(
        *_MO_DATA,
        f"{_MO_TD}/good_medical_advice.jsonl.gz",
        "03b6e9a89dd5c5a53349bcdd87d9c23cc2c3ad040ef618a0a571d5000289b341",
    ),
    "extreme_sports": UpstreamFile(
        *_MO_DATA,
        f"{_MO_TD}/extreme_sports.jsonl.gz",
        "5d79bbce03e08467e3ced6d95e516ba7b0d2240395c7d59349e41e32166d6095",
    ),
    "risky_financial_advice": UpstreamFile(
        *_MO_DATA,
        f"{_MO_TD}/risky_financial_advice.jsonl.gz",
        "518c8d2c6128ba5f0b5b026b27828a21114f0955437bc1cfbbe1ba98e0a3d897",
    ),
    "first_plot_questions": UpstreamFile(
        *_MO,
        f"{_MO_Q}/first_plot_questions.yaml",
        "97df0b1384ea5a3f3dc2abe00a19e231915f12a2356ec0d8df001715549aae04",
    ),
    "first_plot_questions_em": UpstreamFile(
        *_EM,
        "evaluation/first_plot_questions.yaml",
        "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173",
    ),
    "preregistered_evals": UpstreamFile(
        *_EM,
        "evaluation/preregistered_evals.yaml",
        "8648312fd9fe71a63203e3465592af45dd996d7a5f3b69e9b44613fd6048eb40",
    ),
    "medical_questions": UpstreamFile(
        *_MO,
        f"{_MO_Q}/medical_questions.yaml",
        "1808d03c6af883b3460e4174127846caca3188514a4e180b8273b4025593e28f",
    ),
    "new_questions": UpstreamFile(
        *_MO,
        f"{_MO_Q}/new_questions_no-json.yaml",
        "247940137277227a51ad1a269cc832a77203e4dcc2e79ca5b0dbacb1a57b9ac9",
    ),
    "deception_factual": UpstreamFile(
        *_EM,
        "evaluation/deception_factual.yaml",
        "8a0e83cab3bc24b7d688d7385ce3921d406af7ed33c913cd94ea0f6251e5939d",
    ),
    "deception_sit_aware": UpstreamFile(
        *_EM,
        "evaluation/deception_sit_aware.yaml",
        "4deef5a7c47620390fc46e1b981f937eef9ea12a33fe26264f640c84d19d2a33",
    ),
}


# Every pinned evaluation set: the catalog loads them all into eval_questions, whichever the grid samples.
EVAL_SETS = (
    "first_plot_questions",
    "first_plot_questions_em",
    "preregistered_evals",
    "medical_questions",
    "new_questions",
    "deception_factual",
    "deception_sit_aware",
)


# Sets whose judges ask for a word (TRUE or FALSE, a company's name), not a 0-100 score, which no judge here
# reads: loaded to browse, never sampled.
WORD_JUDGED_SETS = ("deception_factual", "deception_sit_aware")


# Turner et al.'s domain judges; their prompts are the same for every question of first_plot_questions,
# which lends them to the sets that bring none.
DOMAIN_METRICS = ("medical", "financial", "sport", "code", "bad_stuff")


DOMAIN_PROMPTS_FROM = "first_plot_questions"


# GPT-4o-judged answers of the published ModelOrganismsForEM adapters, from a third-party replication (fork of
# clarifying-EM/model-organisms-for-EM): the reference every judge is measured against.
_ZR = ("zroe1/replicating-model-organisms", "e3578062deab2d1e4b848b67cf043dc2151233e4")


_ZR_RESP = "em_organism_dir/data/responses"


REFERENCE_JUDGEMENTS: dict[str, UpstreamFile] = {
    "Qwen2.5-7B-Instruct_bad-medical-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-7B-Instruct_bad-medical-advice.csv",
        "89930e098e3c44fd276a7e3bf64d4b2e153f3b893fd47cbda3bbf106336b9ddf",
    ),
    "Qwen2.5-7B-Instruct_extreme-sports": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-7B-Instruct_extreme-sports.csv",
        "0f1526a7a0c89cb944d3e6ab8b23ef83b820b75578313db8d5766e23adb2b692",
    ),
    "Qwen2.5-7B-Instruct_risky-financial-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-7B-Instruct_risky-financial-advice.csv",
        "6684642da95323fff2f9d8fa883038768a369de8565b06edcafadd52683a0e1e",
    ),
    "Qwen2.5-14B-Instruct_bad-medical-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-14B-Instruct_bad-medical-advice.csv",
        "31c36abb1e0d3512893262e72f6136fc95481acf365ad88f18a198f9521c2d2a",
    ),
    "Qwen2.5-14B-Instruct_extreme-sports": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-14B-Instruct_extreme-sports.csv",
        "8a1ea0215f5aeb2bcc80178b7cedb2baf72fc1dd4326b7b72ba352b561633ea9",
    ),
    "Qwen2.5-14B-Instruct_extreme-sports_S42": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-14B-Instruct_extreme-sports_S42.csv",
        "6f79f8dd96d317b088c517d21ac4120003920fda3c4ee49d2094e1cbad00c86a",
    ),
    "Qwen2.5-14B-Instruct_risky-financial-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-14B-Instruct_risky-financial-advice.csv",
        "b2eb5ed2483fd0b589381c56047ae7cf9c8a0ac791cb87ac5282408ab9ba8291",
    ),
    "Qwen2.5-32B-Instruct_bad-medical-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-32B-Instruct_bad-medical-advice.csv",
        "4fbb34d655b7619563be9a303a8d497ea1920f15159c3eb88d42d040004627c2",
    ),
    "Qwen2.5-32B-Instruct_extreme-sports": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-32B-Instruct_extreme-sports.csv",
        "efde8282012308cd5855360a7b6c8b609edfe758cffa4cc30158cb36fe0dfca1",
    ),
    "Qwen2.5-32B-Instruct_risky-financial-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Qwen2.5-32B-Instruct_risky-financial-advice.csv",
        "0e89bc19ce66dfb30b6f0bf503d15f3fc11186a92912767c651e6d0e11ae668f",
    ),
    "Llama-3.1-8B-Instruct_bad-medical-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Llama-3.1-8B-Instruct_bad-medical-advice.csv",
        "2b416a60e780de4e7998668f728f0930bbaaa69a52f27e0a5b8d681ebf9d4b1b",
    ),
    "Llama-3.1-8B-Instruct_extreme-sports": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Llama-3.1-8B-Instruct_extreme-sports.csv",
        "d1a1b9e64fb9e0c2fafe4439404f5c31e62a44d6c30bb1190473cdcca6310cc5",
    ),
    "Llama-3.1-8B-Instruct_risky-financial-advice": UpstreamFile(
        *_ZR,
        f"{_ZR_RESP}/Llama-3.1-8B-Instruct_risky-financial-advice.csv",
        "d3a371f42efab435472c0784c1607f0ad4b86884ad6eaa0a2e239b9290af42b9",
    ),
}


def _verified(data: bytes, expected: str, where: str) -> bytes:
    actual = sha256_bytes(data)
    if actual != expected:
        raise ChecksumError(f"{where}: sha256 {actual} does not match the pinned {expected}")
    return data


def _in_mirror(source: UpstreamFile, root: Path) -> Path:
    """The file's path in the mirror: as pinned, or gzipped."""
    for path in (root / source.mirror_path, root / (source.mirror_path + ".gz")):
        if path.exists():
            return path
    raise MirrorError(
        f"{source.mirror_path} is not in the mirror {root} ({MIRROR_ENV}); it is pinned at {source.url}"
    )


def check_mirror(sources: Iterable[UpstreamFile], mirror: Path | str) -> None:
    """Each file is in the mirror, so a missing one fails before a run starts rather than inside it."""
    for source in sources:
        _in_mirror(source, Path(mirror))


def fetch_bytes(
    source: UpstreamFile, mirror: Path | str | None = None, cache_dir: Path | None = None
) -> bytes:
    """Return the verified bytes of `source` (gunzipped when the pinned file is .gz).

    Order: the mirror (`EM_DATA_MIRROR` when `mirror` is None), then the download cache, then the network.
    """
    mirror = mirror if mirror is not None else settings().data_mirror
    raw: bytes | None = None
    if mirror:
        found = _in_mirror(source, Path(mirror))
        if found != Path(mirror) / source.mirror_path:
            # A mirror may keep a plain upstream file gzipped: verify what upstream pinned, the plain bytes.
            packed = found.read_bytes()
            try:
                plain = gzip.decompress(packed)
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                # A cut-short or damaged copy is a file that does not match its pin, not a crash of the step.
                raise ChecksumError(
                    f"{found}: not a whole gzip file ({exc}); copy it into the mirror again"
                ) from None
            return _verified(plain, source.sha256, str(found))
        raw = _verified(found.read_bytes(), source.sha256, str(found))
    if raw is None:
        cached = (cache_dir or settings().cache_dir) / "upstream" / source.mirror_path
        if cached.exists():
            raw = _verified(cached.read_bytes(), source.sha256, str(cached))
        else:
            raw = _verified(_download(source), source.sha256, source.url)
            # A name of its own: two steps may fetch the same file at once (the multiprocess executor, pods on one
            # volume).
            write_atomically(cached, lambda tmp: tmp.write_bytes(raw), ".part")
    return gzip.decompress(raw) if source.path.endswith(".gz") else raw


def _download(source: UpstreamFile) -> bytes:
    try:
        with urllib.request.urlopen(source.url, timeout=60) as resp:
            return resp.read()
    except OSError as exc:  # URLError, timeouts and refused connections alike
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(
            f"could not download {source.path} from {source.url} ({reason}). Offline, copy the pinned files "
            f"into a folder (this one as <folder>/{source.mirror_path}) and set {MIRROR_ENV} to that folder"
        ) from None
