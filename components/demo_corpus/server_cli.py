"""``clipmill demo-server``: serve the synthetic crawl's web/ directory until Ctrl-C."""
from __future__ import annotations

import argparse
import signal
import threading

from .crawl import DEMO_BASE_URL
from .server import serve_web


def register(subparsers, add_params_option) -> None:
    p = subparsers.add_parser(
        "demo-server", help="serve data/crawl/web like a misbehaving web server (until Ctrl-C)",
        description=f"Serve a demo_corpus web/ directory. Prints the base URL: it replaces {DEMO_BASE_URL} in "
                    "the crawl's URLs. Behaviours (404, 503, slow, truncated, ...) follow web/routes.json; "
                    "demo_server.slow_seconds sets how long slow URLs stall.")
    add_params_option(p)
    p.add_argument("--web", default=["data/crawl/web"], nargs="+",
                   help="web/ directories: the demo_corpus stage's, and those of appended crawl batches "
                        "(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, params) -> int:
    stop = threading.Event()
    # Ctrl-C and SIGTERM stop the server at any point after start-up, without an exception mid-shutdown.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serve_web(args.web, args.host, args.port, params.demo_server.slow_seconds) as base_url:
            print(base_url, flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
