"""`python -m sisaflow.cli`: the same as the `sisaflow` command."""

from sisaflow.cli import main

raise SystemExit(main())
