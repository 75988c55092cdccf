"""mkdocs hook: long identifiers in a page's table of contents may wrap after their underscores.

The right-hand table of contents of the API page lists names such as
``estimate_context_parallel_memory_savings``, longer than the sidebar is wide. Material clips them;
``layout.css`` lets them wrap, and this hook puts a zero-width space after each underscore between
word characters and between the words of a CamelCase name, so that they wrap there rather than in
the middle of a word. Only the text of a
title changes (never the inside of a tag), and only in the table of contents, not in the headings.
Named in mkdocs.yml under ``hooks:``.
"""

from __future__ import annotations

import re

TAG = re.compile(r"(<[^>]*>)")
BREAK = re.compile(r"(?<=\w_)(?=\w)|(?<=[a-z])(?=[A-Z])")  # after an inner "_", inside CamelCase
ZERO_WIDTH_SPACE = "\u200b"


def breakable(title: str) -> str:
    """``title`` with a zero-width space at every break point of its text (tags untouched)."""
    parts = TAG.split(title)
    return "".join(p if p.startswith("<") else BREAK.sub(ZERO_WIDTH_SPACE, p) for p in parts)


def _walk(items) -> None:
    for item in items:
        item.title = breakable(item.title)
        _walk(item.children)


def on_page_context(context, page, **kwargs):
    """Rewrite the titles of the page's table of contents (mkdocs event, after the page is built)."""
    _walk(page.toc)
    return context
