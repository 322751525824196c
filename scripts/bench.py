#!/usr/bin/env python3
"""vhostd-bench from a checkout (the same as the installed `vhostd-bench` command)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vhostd.initiator.bench import main  # noqa: E402

sys.exit(main())
