#!/usr/bin/env python3
"""Derive the searched architecture, visualize it and retrain it. See `python derive.py --help`."""
import sys

try:
    from nas.cli.derive import main
except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing has started, nothing to report but that
    print("derive.py: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
