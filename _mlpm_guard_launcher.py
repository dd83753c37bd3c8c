"""The ``mlpm-guard`` script's entry point, outside the ``mlpm_guard`` package on purpose.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch is imported, and importing anything from
``mlpm_guard`` imports torch. So the script sets the variable here first, then runs
:func:`mlpm_guard.cli.main`: its threads sleep instead of spinning while they wait, which keeps the
command fast beside other CPU-bound processes (see :mod:`mlpm_guard.model.cpu`). A value the user set is kept.
"""

from __future__ import annotations

import os


def main() -> int:
    """Run the ``mlpm-guard`` command line with passive OpenMP waiting."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before the import below loads torch
    from mlpm_guard.cli import main as cli_main

    return cli_main()
