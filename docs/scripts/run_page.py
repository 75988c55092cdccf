"""Run the Python blocks of one docs page as a reader would: in order, in one namespace, elsewhere.

    python -P docs/scripts/run_page.py BLOCKS.json RESULT.json

``BLOCKS.json`` is a list of ``{"code": str, "first_line": int, "page": str}``; the blocks run in
this process's working directory (the docs test gives each page an empty temporary directory, and
``-P`` keeps the script's own directory off ``sys.path``), so a block can use only what
``pip install`` put on the path, never a file of the repository. ``RESULT.json`` receives
``{"outputs": [str, ...], "error": str | None}``: what each block printed, in order, and the
traceback of the block that raised (the blocks after it are not run). Tracebacks name the line of
the ``.md`` file.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def run_blocks(blocks: list[dict]) -> dict:
    """Execute the blocks in one namespace, capturing each block's standard output."""
    namespace: dict = {"__name__": "__main__"}
    outputs: list[str] = []
    for block in blocks:
        captured = io.StringIO()
        try:
            # Leading newlines make tracebacks name the line of the .md file.
            code = compile("\n" * (block["first_line"] - 1) + block["code"], block["page"], "exec")
            with contextlib.redirect_stdout(captured):
                exec(code, namespace)
        except BaseException:  # noqa: BLE001 - SystemExit too: a block must not end the page
            outputs.append(captured.getvalue())
            return {"outputs": outputs, "error": traceback.format_exc()}
        outputs.append(captured.getvalue())
    return {"outputs": outputs, "error": None}


def main() -> None:
    blocks_path, result_path = sys.argv[1:3]
    with open(blocks_path) as f:
        blocks = json.load(f)
    result = run_blocks(blocks)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
