"""Open every page of the built site in headless Chromium, offline, and check what a reader sees.

    mkdocs build --strict -d /tmp/site
    python docs/scripts/check_site.py /tmp/site          # needs chromium (apt-get install chromium)
    python docs/scripts/check_site.py /tmp/site --screenshots /tmp/shots   # and a PNG of every page

All pages load at once, as iframes of one harness page, in one browser. For each page it checks that

* every formula was rendered by the vendored KaTeX (no raw ``\\(...\\)`` left, no KaTeX error);
* every image on the page is shown, and every file it asked for was served (no 404);
* the page made no request to any host but the local server (read from Chromium's net log:
  every request the page initiated, not the browser's own background traffic);
* nothing is wider than its box in a 1280 px window: no code block, table or display equation
  whose content overflows (scrolls or is clipped), none that sticks out of the text column, and
  no page wider than the window. Each is reported with the page, the element, the heading it
  follows and both widths.

It also opens the front page from disk (file://) with a search and checks that results are listed
(Material's offline plugin).

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
WIDTH = 1280  # the window a reader's laptop gives the site, in CSS px
# Each page loads in an iframe WIDTH px wide. After it has rendered, the harness measures what a reader
# would see: math, images, and every element that is wider than the box it is drawn in.
# An element overflows when its content (scrollWidth; for an equation, the span of what KaTeX drew,
# which a centred display may push out on the left) is wider than its box (clientWidth), or when the
# element sticks out past the right edge of the text column. The page overflows when the document
# is wider than the window (a horizontal scroll bar on the whole page).
HARNESS_HTML = """<!doctype html><html><head><link rel="icon" href="data:,"></head><body><script>
const pages = %s;
const WIDTH = %d;
const results = {};
let pending = pages.length;
const px = x => Math.round(x);
function nearestHeading(doc, el) {
  let found = null;
  for (const h of doc.querySelectorAll("article h1, article h2, article h3, article h4")) {
    if (h.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING) found = h; else break;
  }
  return found ? (found.id ? "#" + found.id : found.textContent.trim().slice(0, 40)) : "top";
}
function contentWidth(kind, box) {
  if (kind !== "equation") return box.scrollWidth;
  // What KaTeX draws: the pieces of .katex-html, from the leftmost to the rightmost (a centred
  // equation wider than its box spills out on both sides). Its hidden MathML copy is not drawn.
  const pieces = [...box.querySelectorAll(".katex-html > *")].map(el => el.getBoundingClientRect());
  if (pieces.length === 0) return box.scrollWidth;
  const drawn = Math.max(...pieces.map(r => r.right)) - Math.min(...pieces.map(r => r.left));
  return Math.max(box.scrollWidth, drawn);
}
function overflows(doc) {
  const found = [];
  const column = doc.querySelector(".md-content__inner") || doc.body;
  const right = column.getBoundingClientRect().right;
  const kinds = [["code block", "article pre"], ["table", "article table"], ["equation", "article .katex-display"]];
  for (const [kind, selector] of kinds) {
    [...doc.querySelectorAll(selector)].forEach((el, i) => {
      // The box to measure is the one that scrolls: Material scrolls a code block inside its
      // <code>, and a table inside the wrapper it puts around it.
      const box = kind === "code block" ? (el.querySelector(":scope > code") || el)
                : kind === "table" ? (el.closest(".md-typeset__scrollwrap") || el) : el;
      const content = contentWidth(kind, box), width = box.clientWidth;
      // A box may reach past the column by its own negative margin (Material's table wrapper does).
      const allowance = Math.max(0, -parseFloat(getComputedStyle(box).marginRight) || 0);
      const sticksOut = box.getBoundingClientRect().right - right - allowance;
      if (content <= width + 1 && sticksOut <= 1) return;
      const item = {kind, index: i + 1, after: nearestHeading(doc, el), content: px(content),
                    box: px(width), column: px(column.clientWidth)};
      if (kind === "code block") {
        const lines = box.textContent.split("\\n");
        const widest = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
        item.columns = widest.length; item.line = widest.trim().slice(0, 60);
      }
      found.push(item);
    });
  }
  const page = doc.documentElement;
  if (page.scrollWidth > page.clientWidth + 1) {
    found.push({kind: "page", index: 1, after: "top", content: page.scrollWidth, box: page.clientWidth,
                column: px(column.clientWidth)});
  }
  return found;
}
for (const page of pages) {
  const frame = document.createElement("iframe");
  frame.style.width = WIDTH + "px"; frame.style.height = "900px";
  // Measure once the page's fonts (KaTeX's among them) are in: widths depend on them.
  frame.onload = () => frame.contentDocument.fonts.ready.then(() => setTimeout(() => {
    const doc = frame.contentDocument;
    results[page] = {
      math: doc.querySelectorAll(".arithmatex").length,
      rendered: doc.querySelectorAll(".arithmatex .katex").length,
      errors: doc.querySelectorAll(".katex-error").length,
      images: [...doc.images].map(img => [img.getAttribute("src"), img.complete && img.naturalWidth > 0]),
      overflow: overflows(doc),
    };
    if (--pending === 0) {
      const out = document.createElement("pre");
      out.id = "results"; out.textContent = JSON.stringify(results);
      document.body.appendChild(out);
    }
  }, 2000));
  frame.src = page;
  document.body.appendChild(frame);
}
</script></body></html>"""


def describe_overflow(page: str, item: dict) -> str:
    """One line a page's author can act on: which element, where on the page, and how wide."""
    what = f"{item['kind']} {item['index']}" if item["kind"] != "page" else "the page"
    line = f"{page}: {what} (after {item['after']}) is {item['content']} px wide in a {item['box']} px box"
    line += f" (text column {item['column']} px at {WIDTH} px)"
    if "columns" in item:
        line += f"; widest line {item['columns']} columns: {item['line']!r}"
    return line


class _Server(http.server.ThreadingHTTPServer):
    """Serves the site and the harness page on 127.0.0.1; records (path, status) of every request."""

    def __init__(self, root: Path, pages: list[str]):
        self.requests: list[tuple[str, int]] = []
        server, harness = self, (HARNESS_HTML % (json.dumps(pages), WIDTH)).encode()

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


def site_pages(site: Path) -> list[str]:
    """The HTML pages of a built site, relative to it (the 404 page aside)."""
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name != "404.html")


def check_site(site: Path, chromium: str, pages: list[str] | None = None) -> dict[str, list[str]]:
    """Load HTML pages of a built site (as iframes of one harness page); return the problems.

    Args:
        site: The directory ``mkdocs build`` wrote.
        chromium: Path of the Chromium executable.
        pages: Pages to check, relative to ``site``; all of them when None.

    Returns:
        One line per problem, by kind: ``"render"`` (math, images, pages that did not load),
        ``"offline"`` (requests off the machine, files not found) and ``"width"`` (anything wider
        than its box at 1280 px). Every list is empty when every page passes.
    """
    pages = site_pages(site) if pages is None else pages
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
    problems: dict[str, list[str]] = {"render": [], "offline": [], "width": []}
    found = re.search(r'<pre id="results">(.*?)</pre>', dom, re.S)
    results = json.loads(html.unescape(found[1])) if found else {}
    if not found:
        problems["render"].append("the harness page did not finish loading every page")
    for page in pages if found else []:
        r = results.get(page)
        if r is None:
            problems["render"].append(f"{page}: did not load")
            continue
        if r["rendered"] < r["math"]:
            problems["render"].append(f"{page}: {r['math'] - r['rendered']} of {r['math']} formulas not rendered")
        if r["errors"]:
            problems["render"].append(f"{page}: KaTeX reported {r['errors']} error(s)")
        problems["render"] += [f"{page}: image not shown: {src}" for src, shown in r["images"] if not shown]
        problems["width"] += [describe_overflow(page, item) for item in r["overflow"]]
    leaving = [url for url in requested if not url.startswith(base_url + "/")]
    problems["offline"] += [f"request leaving the machine: {url}" for url in leaving]
    problems["offline"] += [f"{status} for {path}" for path, status in server.requests if status >= 400]
    return problems


SEARCH_WORD = "attention"  # a word every version of the course has on many pages


def check_search_from_disk(site: Path, chromium: str, word: str = SEARCH_WORD) -> list[str]:
    """Open the site's front page from disk (file://) with a search for ``word``; return the problems.

    Material reads ``?q=`` on load and runs the search. Browsers refuse Web Workers on file:// pages,
    so without Material's offline plugin (and the iframe-worker shim it loads) the search never
    starts and the results list stays empty.

    Args:
        site: The directory ``mkdocs build`` wrote.
        chromium: Path of the Chromium executable.
        word: What to search for; it must occur in the site.

    Returns:
        One line per problem; empty when the search lists pages of the site.
    """
    url = (site.resolve() / "index.html").as_uri() + f"?q={word}"
    with tempfile.TemporaryDirectory() as tmp:
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    links = re.findall(r'href="([^"]*)" class="md-search-result__link"', dom)
    site_uri = site.resolve().as_uri() + "/"
    if not any(link.startswith(site_uri) for link in links):
        meta = re.search(r'class="md-search-result__meta">\s*([^<]*)', dom)
        status = meta[1].strip() if meta else "no search box on the page"
        return [f"search from file:// finds nothing for {word!r} ({status})"]
    return []


def screenshot_pages(site: Path, chromium: str, out: Path, height: int) -> list[Path]:
    """A PNG of the top ``height`` px of every page, opened from disk at WIDTH px, for a person to look at.

    Args:
        site: The directory ``mkdocs build`` wrote.
        chromium: Path of the Chromium executable.
        out: Directory for the PNGs (one per page, named after it).
        height: Height of the window in px (a tall window shows more of a long page).

    Returns:
        The PNG files written.
    """
    out.mkdir(parents=True, exist_ok=True)
    # --disable-gpu would leave the screenshot blank; the compositor runs in software without it.
    flags = [f for f in CHROMIUM_FLAGS if f != "--disable-gpu"] + ["--disable-gpu-compositing"]
    shots = []
    for page in site_pages(site):
        shot = out / (page.replace("/", "_").removesuffix(".html") + ".png")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    chromium,
                    *flags,
                    f"--user-data-dir={tmp}/profile",
                    f"--window-size={WIDTH},{height}",
                    f"--screenshot={shot}",
                    (site.resolve() / page).as_uri(),
                ],
                capture_output=True,
                timeout=120,
            )
        shots += [shot] if shot.is_file() else []
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", type=Path, help="the directory mkdocs built")
    parser.add_argument("--screenshots", type=Path, metavar="DIR", help="also save a screenshot of every page")
    parser.add_argument("--height", type=int, default=4000, help="screenshot window height in px (default 4000)")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    if args.screenshots:
        shots = screenshot_pages(args.site, chromium, args.screenshots, args.height)
        print(f"{len(shots)} screenshots in {args.screenshots}")
    problems = [line for lines in check_site(args.site, chromium).values() for line in lines]
    problems += check_search_from_disk(args.site, chromium)
    for problem in problems:
        print(problem)
    num_pages = sum(1 for p in args.site.rglob("*.html") if p.name != "404.html")
    print(f"{num_pages} pages checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
