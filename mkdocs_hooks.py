"""MkDocs hooks for the docs site (``hooks:`` in mkdocs.yml).

The docstrings cross-reference names the Sphinx way (:class:`Guard`, :meth:`~mlpm_guard.Guard.check`).
mkdocstrings renders the name as code and leaves the role in front of it; this drops the role and
the leading ``~`` so that the API reference reads as plain code.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>~?")


def on_page_content(html: str, **kwargs: object) -> str:
    return ROLE.sub("<code>", html)
