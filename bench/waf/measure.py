"""Detection and false-positive rates of the ``waf`` filter kind on the test corpus.

    .venv/bin/python bench/waf/measure.py                    # the table, paranoia 1-4
    .venv/bin/python bench/waf/measure.py --paranoia 1 --misses --false-positives
    .venv/bin/python bench/waf/measure.py --profile etc/pega-chat.ini --false-positives

The corpus is tests/waf_corpus/attacks*.txt (attack payloads by category) and
tests/waf_corpus/benign*.txt (customer-service chat traffic), in three sets:
``attacks.txt``/``benign.txt``, ``*_holdout.txt`` and ``*_blind.txt`` (written
for the hand-written rule set chatproxy had before it ran the CRS; the CRS
was never tuned on them); ``--by-set`` prints each set on its own. Each line
is sent in two forms, straight to the filter object (no network; the engine
is ModSecurity with the CRS, as the filter runs it):

- ``query``: as the value of a query argument (``GET /prweb/PRChat/app?q=...``,
  percent-encoded once) of a browser-like request with a User-Agent, Accept,
  Referer and session cookies; a benign ``query:`` line is the whole query string.
- ``ws``: as the ``text`` of a JSON WebSocket message from the client
  (``{"type": "message", "text": ...}``); a benign ``query:`` line's decoded
  arguments are the JSON object.

An attack is detected when the filter would refuse the request (403) or close
the session (1008); a benign line is a false positive when it would. The rates
are printed per category and paranoia level. ``--profile FILE`` measures with
the options of a configuration's ``waf`` filter section (``--section`` names
another), e.g. a vendor profile's exclusions.
"""

from __future__ import annotations

import argparse
import configparser
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer  # noqa: E402

from chatproxy.filters.waf import WebApplicationFirewall, waf  # noqa: E402
from chatproxy.filters.waf_results import message_transaction, request_transaction  # noqa: E402
from chatproxy.http.messages import RequestHead  # noqa: E402

CORPUS = ROOT / "tests" / "waf_corpus"
CATEGORIES = ("sqli", "xss", "lfi", "rce", "protocol")
FORMS = ("query", "ws")

_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "0": "\x00", "\\": "\\"}


def unescape(text: str) -> str:
    """The ``esc:`` line syntax: \\r \\n \\t \\0 \\xHH \\\\."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            digits = text[i + 2 : i + 4]
            if nxt == "x" and len(digits) == 2 and all(d in "0123456789abcdefABCDEF" for d in digits):
                out.append(chr(int(digits, 16)))
                i += 4
                continue
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
        out.append(char)
        i += 1
    return "".join(out)


def _lines(path: Path) -> Iterator[str]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line == "#" or line.startswith("# "):
            continue
        yield unescape(line[4:]) if line.startswith("esc:") else line


SETS = {"main": "", "holdout": "_holdout", "blind": "_blind"}


def load_attacks(path: Path | None = None) -> list[tuple[str, str]]:
    """(category, payload) pairs of one file, or of all the sets."""
    if path is None:
        return [item for suffix in SETS.values() for item in load_attacks(CORPUS / f"attacks{suffix}.txt")]
    category = None
    attacks = []
    for line in _lines(path):
        if line.startswith("[") and line.endswith("]") and line[1:-1] in CATEGORIES:
            category = line[1:-1]
            continue
        if category is None:
            raise ValueError(f"{path}: payload before the first [category]: {line!r}")
        attacks.append((category, line))
    return attacks


def load_benign(path: Path | None = None) -> list[str]:
    """Benign lines (``query:`` lines keep their prefix) of one file, or of all the sets."""
    if path is None:
        return [line for suffix in SETS.values() for line in load_benign(CORPUS / f"benign{suffix}.txt")]
    return list(_lines(path))


BROWSER_HEADERS = [
    ("Host", "chat.example.com"),
    ("User-Agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                   "Chrome/120.0.0.0 Safari/537.36"),
    ("Accept", "application/json, text/javascript, */*; q=0.01"),
    ("Accept-Language", "en-GB,en;q=0.9,fr;q=0.8"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Referer", "https://chat.example.com/prweb/PRChat/app/default/?pyActivity=pyGetChatSession&ref=email"),
    ("Origin", "https://chat.example.com"),
    ("Cookie", "JSESSIONID=9F2C4E1A7B3D5F60A1B2C3D4E5F60718; Pega-RULES=%7B%7Dr4cLkZ%2BvQx%3D%3D; "
               "_ga=GA1.2.1234567890.1699999999; consent=necessary%2Canalytics"),
    ("Sec-Fetch-Mode", "cors"),
    ("Sec-CH-UA", '"Chromium";v="120", "Not?A_Brand";v="8"'),
    ("X-Requested-With", "XMLHttpRequest"),
]


def make_head(query: str, path: str = "/prweb/PRChat/app/default/", method: str = "GET",
              headers: list[tuple[str, str]] | None = None) -> RequestHead:
    """A browser-like request head with this raw query string."""
    raw = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in (headers or BROWSER_HEADERS))
    target = path + ("?" + query if query else "")
    return RequestHead(method=method, target=target, path=path, query=query, version="1.1", headers=raw,
                       host="chat.example.com", authority="chat.example.com", client="198.51.100.7",
                       peer="198.51.100.7", tls=True, listener="main", route="chat")


WS_HEAD = make_head("", path="/prweb/PRChat/ws")


def query_of(line: str) -> str:
    """The raw query string for a corpus line."""
    if line.startswith("query:"):
        return line[6:]
    return "q=" + quote(line, safe="")


def message_of(line: str) -> bytes:
    """The JSON WebSocket message for a corpus line."""
    if line.startswith("query:"):
        document: Any = dict(parse_qsl(line[6:], keep_blank_values=True))
    else:
        document = {"type": "message", "text": line}
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def decided(result: Any) -> Any:
    """A hook's decision: the value of its Deferred (fired: the offload runs at once)."""
    if not isinstance(result, defer.Deferred):
        return result
    found: list[Any] = []
    result.addBoth(found.append)
    return found[0]


def build(options: dict[str, str]) -> WebApplicationFirewall:
    """A waf built from ``options`` whose transactions run at once, in this thread."""
    firewall = waf.build(options)
    firewall.offload = lambda work: defer.succeed(work())
    return firewall


def blocked(firewall: WebApplicationFirewall, form: str, line: str) -> bool:
    """Whether the filter would refuse this line in this form."""
    if form == "query":
        return decided(firewall.request(make_head(query_of(line)))) is not None
    return decided(firewall.message(WS_HEAD, message_of(line), False, True)) is not None


def matched_rules(firewall: WebApplicationFirewall, form: str, line: str) -> list[int]:
    """The rule ids that match this line in this form (for the reports)."""
    if form == "query":
        transaction = request_transaction(make_head(query_of(line)))
    else:
        transaction = message_transaction(WS_HEAD, message_of(line), False)
    return list(firewall.inspect(transaction).rule_ids)


def measure(firewall: WebApplicationFirewall, form: str, attacks: list[tuple[str, str]],
            benign: list[str]) -> dict[str, Any]:
    """Detection per category, false positives, and the lists of both failures."""
    caught: dict[str, int] = {c: 0 for c in CATEGORIES}
    total: dict[str, int] = {c: 0 for c in CATEGORIES}
    misses: list[tuple[str, str]] = []
    started = time.perf_counter()
    for category, payload in attacks:
        total[category] += 1
        if blocked(firewall, form, payload):
            caught[category] += 1
        else:
            misses.append((category, payload))
    false_positives = [line for line in benign if blocked(firewall, form, line)]
    elapsed = time.perf_counter() - started
    return {
        "detection": {c: caught[c] / total[c] if total[c] else 1.0 for c in CATEGORIES},
        "caught": caught, "total": total,
        "overall": sum(caught.values()) / max(1, sum(total.values())),
        "false_positive_rate": len(false_positives) / max(1, len(benign)),
        "false_positives": false_positives, "misses": misses,
        "microseconds_per_item": elapsed / max(1, len(attacks) + len(benign)) * 1e6,
    }


def report(firewall: WebApplicationFirewall, name: str, level: int, form: str, result: dict[str, Any],
           misses: bool, false_positives: bool) -> None:
    """One row of the table (and the misses / false positives when asked for)."""
    print(f"{name:>7} {level:>8} {form:>5} "
          + " ".join(f"{result['detection'][c] * 100:7.1f}%" for c in CATEGORIES)
          + f" {result['overall'] * 100:6.1f}% {result['false_positive_rate'] * 100:5.1f}%"
          + f" {len(result['false_positives']):>4} {result['microseconds_per_item']:8.0f}")
    if misses:
        for category, payload in result["misses"]:
            print(f"    missed {category:8} {payload!r}")
    if false_positives:
        for line in result["false_positives"]:
            print(f"    false positive {line!r}: rules {matched_rules(firewall, form, line)}")


def profile_options(path: str, section: str) -> dict[str, str]:
    """The options of a configuration file's filter section, but ``use`` and the
    generic ``mode`` and ``refused_message``."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    if not parser.has_section(f"filter:{section}"):
        raise SystemExit(f"{path} has no [filter:{section}] section")
    return {name: value for name, value in parser.items(f"filter:{section}")
            if name not in ("use", "mode", "refused_message")}


def main(argv: list[str] | None = None) -> int:
    """Print the table (and, on request, the misses and false positives)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paranoia", type=int, action="append", choices=(1, 2, 3, 4),
                        help="paranoia level(s) to measure (default: 1 to 4, or the profile's)")
    parser.add_argument("--threshold", type=int, help="inbound anomaly threshold (default: 5, or the profile's)")
    parser.add_argument("--profile", help="a configuration file whose waf filter section's options to use")
    parser.add_argument("--section", default="waf", help="the filter section of --profile (default: waf)")
    parser.add_argument("--form", choices=FORMS, action="append", help="query and/or ws (default: both)")
    parser.add_argument("--misses", action="store_true", help="list the attacks that pass")
    parser.add_argument("--false-positives", action="store_true", help="list the benign lines refused")
    parser.add_argument("--by-set", action="store_true", help="one row per corpus set (main, holdout, blind)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    attacks, benign = load_attacks(), load_benign()
    corpora = {"all": (attacks, benign)}
    if args.by_set:
        corpora = {name: (load_attacks(CORPUS / f"attacks{suffix}.txt"), load_benign(CORPUS / f"benign{suffix}.txt"))
                   for name, suffix in SETS.items()}
    options = profile_options(args.profile, args.section) if args.profile else {}
    if args.threshold is not None:
        options["inbound_anomaly_threshold"] = str(args.threshold)
    levels = args.paranoia or ([int(options["paranoia"])] if "paranoia" in options else [1, 2, 3, 4])
    forms = args.form or list(FORMS)
    counts = {c: sum(1 for cat, _ in attacks if cat == c) for c in CATEGORIES}
    print(f"corpus: {len(attacks)} attacks ({', '.join(f'{c} {n}' for c, n in counts.items())}), "
          f"{len(benign)} benign lines; options {options or 'defaults'}")
    header = f"{'set':>7} {'paranoia':>8} {'form':>5} " + " ".join(f"{c:>8}" for c in CATEGORIES) + \
        f" {'all':>7} {'FP':>6} {'FPs':>4} {'us/item':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for level in levels:
        firewall = build({**options, "paranoia": str(level)})
        print(f"# {firewall.engine.version}, OWASP CRS {firewall.crs.version} ({firewall.crs.rules_dir})")
        for form in forms:
            for name, (set_attacks, set_benign) in corpora.items():
                result = measure(firewall, form, set_attacks, set_benign)
                results.append({"set": name, "paranoia": level, "form": form, **result})
                report(firewall, name, level, form, result, args.misses, args.false_positives)
    if args.json:
        print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
