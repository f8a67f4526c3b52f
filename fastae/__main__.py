"""`python -m fastae` is the `fastae` command."""

from fastae.cli import main

raise SystemExit(main())
