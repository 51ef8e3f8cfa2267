"""`python -m flowmatch COMMAND`: the command line; flowmatch/cli/__init__.py and `--help` list the commands."""
import sys

from flowmatch.cli.main import main

sys.exit(main())
