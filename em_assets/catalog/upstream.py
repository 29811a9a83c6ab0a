"""Pinned upstream files (URL + sha256), fetched once or read from a local mirror, always verified."""

from __future__ import annotations

import gzip
import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from em_assets.settings import MIRROR_ENV, settings


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
}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verified(data: bytes, expected: str, where: str) -> bytes:
    actual = sha256_bytes(data)
    if actual != expected:
        raise ChecksumError(f"{where}: sha256 {actual} does not match the pinned {expected}")
    return data


def fetch_bytes(
    source: UpstreamFile, mirror: Path | str | None = None, cache_dir: Path | None = None
) -> bytes:
    """Return the verified bytes of `source` (gunzipped when the pinned file is .gz).

    Order: the mirror (`EM_DATA_MIRROR` when `mirror` is None), then the download cache, then the network.
    """
    mirror = mirror if mirror is not None else settings().data_mirror
    raw: bytes | None = None
    where = source.url
    if mirror:
        root = Path(mirror)
        exact = root / source.mirror_path
        if exact.exists():
            where = str(exact)
            raw = _verified(exact.read_bytes(), source.sha256, where)
        elif (root / (source.mirror_path + ".gz")).exists():
            # A mirror may keep a plain upstream file gzipped: verify what upstream pinned, the plain bytes.
            where = str(root / (source.mirror_path + ".gz"))
            return _verified(gzip.decompress(Path(where).read_bytes()), source.sha256, where)
        else:
            raise FileNotFoundError(f"{source.mirror_path} is not in the mirror {root} ({MIRROR_ENV})")
    if raw is None:
        cached = (cache_dir or settings().cache_dir) / "upstream" / source.mirror_path
        if cached.exists():
            raw = _verified(cached.read_bytes(), source.sha256, str(cached))
        else:
            with urllib.request.urlopen(source.url, timeout=60) as resp:
                raw = _verified(resp.read(), source.sha256, source.url)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(cached.suffix + ".part")
            tmp.write_bytes(raw)
            tmp.replace(cached)
    return gzip.decompress(raw) if source.path.endswith(".gz") else raw
