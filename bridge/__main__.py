"""`python -m bridge` is `m2m-bridge`."""

import sys

from bridge.cli import main

sys.exit(main())
