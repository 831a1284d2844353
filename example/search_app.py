"""A small web page to search an indexed collection of sounds (example/index.py): type what you want to hear, get
the best-matching files with their scores, and play them in the browser.

    python example/search_app.py --index sounds.h5        # then open http://127.0.0.1:8000

It serves the page, the JSON endpoint /api/search?q=QUERY&k=10 and the indexed files themselves (only those: no
other path is served). It listens on 127.0.0.1 unless given --host, and has no authentication: anyone who can
reach the address can search the collection and download its files.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import mimetypes
import shutil
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_index_search_arguments, exit_on_input_error, make_parser, setup_logging

MAX_RESULTS = 100
LOOPBACK_NAMES = {
    "127.0.0.1",
    "localhost",
    "::1",
}  # the Host names a local page is reached by (urlsplit unbrackets ::1)
log = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Sound search</title>
<style>
  body { font-family: sans-serif; max-width: 50rem; margin: 2rem auto; padding: 0 1rem; }
  form { display: flex; gap: .5rem; }
  #q { flex: 1; font-size: 1.1rem; padding: .3rem; }
  #k { width: 4rem; }
  li { margin: .6rem 0; }
  .score { font-family: monospace; margin-right: .6rem; }
  audio { display: block; margin-top: .2rem; width: 100%; }
</style>
</head>
<body>
<h1>Sound search</h1>
<form id="search">
  <input id="q" name="q" type="search" placeholder="Describe a sound, e.g. three high beeps" required autofocus>
  <input id="k" name="k" type="number" min="1" max="100" value="10" title="results">
  <button type="submit">Search</button>
</form>
<p id="status"></p>
<ol id="results"></ol>
<script>
document.getElementById("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = document.getElementById("q").value, k = document.getElementById("k").value;
  const status = document.getElementById("status"), list = document.getElementById("results");
  status.textContent = "Searching...";
  list.replaceChildren();
  const response = await fetch(`/api/search?q=${encodeURIComponent(query)}&k=${encodeURIComponent(k)}`);
  const answer = await response.json();
  if (!response.ok) {
    status.textContent = answer.error;
    return;
  }
  status.textContent = `${answer.results.length} files for "${answer.query}"`;
  for (const hit of answer.results) {  // textContent, never HTML: file names are shown as they are
    const item = document.createElement("li"), score = document.createElement("span");
    const name = document.createElement("span"), player = document.createElement("audio");
    item.className = "result";
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    name.className = "file";
    name.textContent = hit.file;
    player.controls = true;
    player.preload = "none";
    player.src = hit.audio;
    item.append(score, name, player);
    list.append(item);
  }
});
</script>
</body>
</html>
"""


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free one)")
    add_index_search_arguments(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

from example.search import CollectionSearch, as_records, open_search


def main() -> None:
    args = build_parser().parse_args()
    setup_logging()
    with exit_on_input_error():
        if not only_this_machine(args.host):
            log.warning(
                "listening on %s: anyone who reaches it can search the collection and download its files (no "
                "authentication); prefer 127.0.0.1 and an SSH tunnel",
                args.host,
            )
        server = make_server(open_search(args), args.host, args.port, args.shortlist)
        log.info("searching %s at http://%s:%d/ (Ctrl-C stops)", args.index, *server.server_address[:2])
        try:
            server.serve_forever()
        finally:
            server.server_close()


def only_this_machine(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address, reachable from this machine only."""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def make_server(search: CollectionSearch, host: str, port: int, shortlist: int = 100) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``search``: the page at ``/``, results as JSON at ``/api/search?q=&k=``,
    and at ``/audio?f=NAME`` an indexed file, looked up by its indexed name (never a path from the request)."""
    lock = threading.Lock()  # one query at a time through the model
    root = search.root.resolve()
    # Bound to this machine, the page answers only requests addressed to it by a loopback name: a web page that
    # rebinds its own domain to 127.0.0.1 (DNS rebinding) sends its own host name and is refused.
    hosts = LOOPBACK_NAMES if only_this_machine(host) else None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if hosts is not None and urlsplit(f"//{self.headers.get('Host', '')}").hostname not in hosts:
                self.reply(403, b"this page answers requests for 127.0.0.1 or localhost only\n", "text/plain")
                return
            url = urlsplit(self.path)
            params = {key: values[0] for key, values in parse_qs(url.query).items()}
            if url.path == "/":
                self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/search":
                self.send_results(params)
            elif url.path == "/audio":
                self.send_audio(params.get("f", ""))
            else:
                self.reply(404, b"not found\n", "text/plain; charset=utf-8")

        def send_results(self, params: dict[str, str]) -> None:
            query, k = params.get("q", "").strip(), params.get("k", "10")
            if not query or not k.isdigit() or not 1 <= int(k) <= MAX_RESULTS:
                self.send_json(400, {"error": f"give a query q and a number of results k from 1 to {MAX_RESULTS}"})
                return
            with lock:
                hits = search.text([query], int(k), shortlist)[0]
            results = [{**record, "audio": f"/audio?f={quote(record['file'])}"} for record in as_records(hits)]
            self.send_json(200, {"query": query, "results": results})

        def send_audio(self, name: str) -> None:
            # only indexed names, and none that climbs out of the root (a linked clip is served: its name is indexed)
            indexed = name in search.rows and ".." not in Path(name).parts and not Path(name).is_absolute()
            path = root / name if indexed else None
            if path is None or not path.is_file():
                self.reply(404, b"not an indexed file\n", "text/plain; charset=utf-8")
                return
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            # a player that is paused or replaced stops reading: not an error
            with path.open("rb") as f, contextlib.suppress(ConnectionError):
                shutil.copyfileobj(f, self.wfile)

        def send_json(self, status: int, body: dict[str, object]) -> None:
            self.reply(status, json.dumps(body, ensure_ascii=False).encode(), "application/json")

        def reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # http.server's signature
            log.debug("%s " + format, self.address_string(), *args)

    class Server(ThreadingHTTPServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6, as host is
        daemon_threads = True  # open connections do not keep the process alive after Ctrl-C

    return Server((host, port), Handler)


if __name__ == "__main__":
    main()
