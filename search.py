#!/usr/bin/env python3
"""Search the scan directions of a vision Mamba supernet. See `python search.py --help`."""
import sys

from nas.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
