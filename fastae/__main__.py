"""`python -m fastae` is the `fastae` command."""

from fastae.cli import main

# The guard keeps a process started by the "spawn" method (fastae train --nproc) that imports this
# module from running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
