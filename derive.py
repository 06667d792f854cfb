#!/usr/bin/env python3
"""Derive the searched architecture, visualize it and retrain it. See `python derive.py --help`."""
import sys

from nas.cli.derive import main

if __name__ == "__main__":
    sys.exit(main())
