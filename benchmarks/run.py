"""Run the fastae benchmark from a checkout: `python benchmarks/run.py [options]`.

The same as `fastae bench` and `python -m fastae.bench`; see fastae/bench.py for what is timed
and `python benchmarks/run.py --help` for the options. Results go to benchmarks/results/.
"""

import sys

from fastae.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
