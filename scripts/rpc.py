#!/usr/bin/env python3
"""Run vhostd-rpc from a checkout: scripts/rpc.py METHOD [key=value ...]."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vhostd.rpc.client import main  # noqa: E402

sys.exit(main())
