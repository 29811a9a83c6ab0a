"""`python -m em_assets.cli`, the same as the `em-assets` script."""

import sys

from em_assets.cli import main

sys.exit(main())
