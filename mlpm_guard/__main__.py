"""``python -m mlpm_guard`` is the ``mlpm-guard`` command."""

from .cli import main

raise SystemExit(main())
