"""`python -m meshplan.rl train ...`: the same command as `meshplan train`."""
import sys

from .cli import main

sys.exit(main())
