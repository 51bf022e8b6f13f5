"""`python -m qwen2vl ...` runs the `qwen2vl` command."""

import sys

from qwen2vl.cli import main

sys.exit(main())
