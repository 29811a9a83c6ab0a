"""Where things are: the repository root and the `em-assets` console script of this interpreter's venv."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
EM_ASSETS = str(Path(sys.executable).with_name("em-assets"))
