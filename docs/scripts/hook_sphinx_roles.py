"""mkdocs hook: Sphinx cross-reference roles in docstrings become links on the API page.

Docstrings here use Sphinx roles (:func:`~cp_dtensor.ring_attention`), which mkdocstrings leaves as
text (":func:" followed by code). This hook turns each into an mkdocs-autorefs reference: a link
when the name is documented on the site, plain code otherwise (``optional``: no warning). A leading
``~`` shows only the last component, as in Sphinx. Named in mkdocs.yml under ``hooks:``.
"""

from __future__ import annotations

import html
import re

ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):<code>(?P<tilde>~?)(?P<path>[\w.]+)</code>")


def link(match: re.Match) -> str:
    """The autorefs element for one role."""
    path = match["path"]
    shown = path.rsplit(".", 1)[-1] if match["tilde"] else path
    return f'<autoref identifier="{html.escape(path)}" optional><code>{html.escape(shown)}</code></autoref>'


def on_page_content(html_text: str, **kwargs) -> str:
    """Replace every Sphinx role of a page's HTML (mkdocs event, before autorefs resolves links)."""
    return ROLE.sub(link, html_text)
