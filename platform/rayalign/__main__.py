"""``python -m rayalign ...``: the same CLI, for job entrypoints where the script is not on PATH."""

import sys

from rayalign.cli import main

sys.exit(main())
