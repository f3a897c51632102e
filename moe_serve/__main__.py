"""`python -m moe_serve` is the `moe-serve` command."""

from moe_serve.cli import main

raise SystemExit(main())
