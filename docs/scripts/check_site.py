"""Open every page of the built site in headless Chromium, offline, and check what a reader sees.

    mkdocs build --strict -d /tmp/site
    python docs/scripts/check_site.py /tmp/site          # needs chromium (apt-get install chromium)

All pages load at once, as iframes of one harness page, in one browser. For each page it checks that

* every formula was rendered by the vendored KaTeX (no raw ``\\(...\\)`` left, no KaTeX error);
* every image on the page is shown, and every file it asked for was served (no 404);
* the page made no request to any host but the local server (read from Chromium's net log:
  every request the page initiated, not the browser's own background traffic).

Exit status 0 when every page passes; otherwise it prints what failed.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-features=AutofillServerCommunication,Translate,OptimizationHints,MediaRouter",
    "--virtual-time-budget=5000",
]


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome executable, or None."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((p for p in map(shutil.which, names) if p), None)


HARNESS = "/__check_site__.html"
HARNESS_HTML = """<!doctype html><html><head><link rel="icon" href="data:,"></head><body><script>
const pages = %s;
const results = {};
let pending = pages.length;
for (const page of pages) {
  const frame = document.createElement("iframe");
  frame.style.width = "1200px"; frame.style.height = "900px";
  frame.onload = () => setTimeout(() => {
    const doc = frame.contentDocument;
    results[page] = {
      math: doc.querySelectorAll(".arithmatex").length,
      rendered: doc.querySelectorAll(".arithmatex .katex").length,
      errors: doc.querySelectorAll(".katex-error").length,
      images: [...doc.images].map(img => [img.getAttribute("src"), img.complete && img.naturalWidth > 0]),
    };
    if (--pending === 0) {
      const out = document.createElement("pre");
      out.id = "results"; out.textContent = JSON.stringify(results);
      document.body.appendChild(out);
    }
  }, 2000);
  frame.src = page;
  document.body.appendChild(frame);
}
</script></body></html>"""


class _Server(http.server.ThreadingHTTPServer):
    """Serves the site and the harness page on 127.0.0.1; records (path, status) of every request."""

    def __init__(self, root: Path, pages: list[str]):
        self.requests: list[tuple[str, int]] = []
        server, harness = self, (HARNESS_HTML % json.dumps(pages)).encode()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if self.path != HARNESS:
                    return super().do_GET()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(harness)))
                self.end_headers()
                self.wfile.write(harness)

            def log_request(self, code="-", size="-"):
                server.requests.append((self.path, int(code)))

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))


def _page_requests(net_log: Path, origin: str) -> list[str]:
    """URLs the pages themselves requested: those whose initiator is the site's origin.

    The browser's own traffic (autofill, time sync, ...) has no such initiator and is not the
    site's doing; the harness document has none either, but it is the local URL we asked for.
    """
    text = net_log.read_text()
    if not text.rstrip().endswith("}"):  # a log cut short by the browser's exit
        text = text.rstrip().rstrip(",") + "]}"
    log = json.loads(text)
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in log["events"]
        if e["type"] == start_job and e.get("params", {}).get("initiator") == origin
    ]


def check_site(site: Path, chromium: str) -> list[str]:
    """Load every HTML page of a built site (as iframes of one harness page); return the problems."""
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name != "404.html")
    server = _Server(site, pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            net_log = Path(tmp) / "netlog.json"
            dom = subprocess.run(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={tmp}/profile",
                    f"--log-net-log={net_log}",
                    "--dump-dom",
                    base_url + HARNESS,
                ],
                capture_output=True,
                text=True,
                timeout=300,
            ).stdout
            requested = _page_requests(net_log, base_url)
    finally:
        server.shutdown()
    found = re.search(r'<pre id="results">(.*?)</pre>', dom, re.S)
    if not found:
        return ["the harness page did not finish loading every page"]
    results = json.loads(html.unescape(found[1]))
    problems = []
    for page in pages:
        r = results.get(page)
        if r is None:
            problems.append(f"{page}: did not load")
            continue
        if r["rendered"] < r["math"]:
            problems.append(f"{page}: {r['math'] - r['rendered']} of {r['math']} formulas not rendered by KaTeX")
        if r["errors"]:
            problems.append(f"{page}: KaTeX reported {r['errors']} error(s)")
        problems += [f"{page}: image not shown: {src}" for src, shown in r["images"] if not shown]
    problems += [f"request leaving the machine: {url}" for url in requested if not url.startswith(base_url + "/")]
    problems += [f"{status} for {path}" for path, status in server.requests if status >= 400]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", type=Path, help="the directory mkdocs built")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    problems = check_site(args.site, chromium)
    for problem in problems:
        print(problem)
    num_pages = sum(1 for p in args.site.rglob("*.html") if p.name != "404.html")
    print(f"{num_pages} pages checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
