"""`python -m fastsandbox.agent`: run one agent daemon (see `cli.py`)."""

import sys

from fastsandbox.agent.cli import main

sys.exit(main())
