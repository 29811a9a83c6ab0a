"""`python -m em_assets.bench` (`make bench`)."""

import sys

from em_assets.bench.run import main

sys.exit(main())
