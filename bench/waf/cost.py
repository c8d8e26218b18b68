"""What the ``waf`` filter costs per request, body, response and message, and whether its engine
runs in parallel with Python (the binding releases the GIL).

    .venv/bin/python bench/waf/cost.py
    .venv/bin/python bench/waf/cost.py --paranoia 4 --repeat 50

Each case is one transaction through the engine as the filter runs it (ModSecurity
with the CRS the filter loads, no network): CPU time per item in one thread
(``time.process_time``), then the wall time of the same work in one thread and
split over two threads: with the GIL released during the engine's calls two threads
finish in about half the time on two idle cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chatproxy.filters.modsecurity import Transaction  # noqa: E402
from chatproxy.filters.waf import WebApplicationFirewall, waf  # noqa: E402
from chatproxy.filters.waf_results import message_transaction, request_transaction  # noqa: E402
from chatproxy.filters.waf_results import response_transaction  # noqa: E402
from chatproxy.testing import request_head, websocket_head  # noqa: E402

BROWSER = [("User-Agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                          "Chrome/120.0.0.0 Safari/537.36"),
           ("Accept", "application/json, text/javascript, */*; q=0.01"),
           ("Accept-Language", "en-GB,en;q=0.9"), ("Origin", "https://chat.example.com"),
           ("Referer", "https://chat.example.com/prweb/PRChat/app/default/?pyActivity=pyGetChatSession"),
           ("Cookie", "JSESSIONID=9F2C4E1A7B3D5F60A1B2C3D4E5F60718; Pega-RULES=%7B%7Dr4cLkZ")]
CHAT = "Hi, I ordered a blue jacket last week (order #4711) and it has not arrived yet, can you help me? Thanks"


def text_of(size: int) -> str:
    """Chat-like text of ``size`` characters."""
    return (CHAT + " ") * (size // (len(CHAT) + 1)) + "x" * (size % (len(CHAT) + 1))


def json_body(size: int, fields: int) -> bytes:
    """A JSON object of ``fields`` chat-text fields, about ``size`` bytes."""
    each = max(1, size // fields - 12)
    return json.dumps({f"field{i}": text_of(each) for i in range(fields)}).encode()


def cases() -> dict[str, Transaction]:
    """The transactions measured, by name."""
    small = request_head("/prweb/PRChat/app/default/?pyActivity=pzMashupRequest&q=" + quote(CHAT, safe=""),
                         headers=BROWSER)
    found = {"GET, chat text in the query": request_transaction(small)}
    for fields in (1, 64, 1024):
        body = json_body(64 * 1024, fields)
        head = request_head("/prweb/PRChat/app/default/send", method="POST",
                            headers=[*BROWSER, ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        found[f"POST, 64 KiB JSON, {fields} field(s)"] = request_transaction(head, body)
    session = websocket_head("/prweb/PRPushServlet/app/default/", headers=BROWSER)
    for size in (200, 8 * 1024):
        message = json.dumps({"type": "message", "text": text_of(size)}).encode()
        found[f"message, {len(message)} B JSON"] = message_transaction(session, message, False)
    page = request_head("/prweb/PRChat/app/default/", headers=BROWSER)
    for size in (2 * 1024, 64 * 1024):
        html = ("<html><body>" + "<p>" + text_of(size - 30) + "</p></body></html>").encode()
        found[f"response, {len(html) // 1024} KiB HTML"] = response_transaction(
            page, 200, [(b"Content-Type", b"text/html; charset=utf-8")], html)
    return found


def cpu_per_item(flt: WebApplicationFirewall, transaction: Transaction, repeat: int) -> float:
    """CPU seconds per transaction, one thread."""
    flt.inspect(transaction)  # warm
    started = time.process_time()
    for _ in range(repeat):
        flt.inspect(transaction)
    return (time.process_time() - started) / repeat


def wall(work: Callable[[], None], threads: int) -> float:
    """Wall seconds for ``threads`` threads each running ``work``."""
    running = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paranoia", type=int, default=1, choices=(1, 2, 3, 4))
    parser.add_argument("--repeat", type=int, default=20, help="items per measurement (default 20)")
    args = parser.parse_args(argv)
    flt = waf.build({"paranoia": str(args.paranoia), "inspect_body_bytes": "64k", "inspect_responses": "yes"})
    print(f"# {flt.engine.version}, OWASP CRS {flt.crs.version}, paranoia {args.paranoia}")
    print(f"{'case':40} {'CPU ms/item':>12} {'1 thread s':>11} {'2 threads s':>12} {'speed-up':>9}")
    for name, transaction in cases().items():
        size = len(transaction.body or b"") + (len(transaction.response.body) if transaction.response else 0)
        repeat = args.repeat if size < 10000 else max(2, args.repeat // 4)
        cpu = cpu_per_item(flt, transaction, repeat)

        def work(count: int = repeat, t: Transaction = transaction) -> None:
            for _ in range(count):
                flt.inspect(t)

        one = wall(lambda: work(2 * repeat), 1)
        two = wall(work, 2)
        print(f"{name:40} {cpu * 1000:12.2f} {one:11.3f} {two:12.3f} {one / two:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
