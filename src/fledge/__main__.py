"""`python -m fledge ...` (and `torchrun ... -m fledge train RECIPE`) runs the CLI."""

from fledge.cli import main

raise SystemExit(main())
