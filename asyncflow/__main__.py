"""`python -m asyncflow` is the `asyncflow` command."""

from asyncflow.cli import main

raise SystemExit(main())
