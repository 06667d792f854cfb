#!/usr/bin/env python3
"""Search the scan directions of a vision Mamba supernet. See `python search.py --help`."""
import sys

try:
    from nas.cli.search import main
except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing has started, nothing to report but that
    print("search.py: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
