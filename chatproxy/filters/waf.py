"""The ``waf`` filter kind: ModSecurity v3 running the OWASP Core Rule Set.

::

    [filter:waf]
    use = waf
    paranoia = 1
    inbound_anomaly_threshold = 5
    inspect_body_bytes = 64k
    exclude_rules = 920350, 942100 ARGS:json.text

The engine is libmodsecurity (Debian's ``libmodsecurity3``, through the cffi
binding :mod:`chatproxy.filters.modsecurity`); the rules are the CRS a
package installed (:mod:`chatproxy.filters.crs`), loaded after chatproxy's
own engine and crs-setup settings and followed by the exclusions
(:mod:`chatproxy.filters.waf_setup`).  Each filter section loads its own rule
set once per configuration plan, so each route can have its own paranoia
level, thresholds and exclusions.

Hooks: ``request`` runs a request that announces no body through every
request phase; ``request_body`` runs the head with the first
``inspect_body_bytes`` of the body; with ``inspect_responses = yes``,
``response_body`` runs each response of the ``response_content_types``
(its status, headers and first ``inspect_response_bytes``) through the
response phases of a rule set of its own (CRS's initialization and response
rules), whose outbound anomaly threshold refuses it; ``message`` runs each client-to-upstream
WebSocket text message (at most ``inspect_message_bytes`` of it) as a request
of its own (:func:`~chatproxy.filters.waf_results.message_transaction`).
Every transaction runs in the waf's thread pool (the binding releases the
GIL), and the hooks return Deferreds: the reactor thread never waits for the
engine.  A refusal is the
engine's intervention status (403 for the inbound anomaly threshold, 400 for
a body that does not parse); a refused message closes the session with
1008 (or is dropped: ``refused_message = drop``).  Report mode is the chain's:
the engine evaluates every rule and the refusal is logged and passed on, as
``SecRuleEngine DetectionOnly`` would.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from chatproxy.filters import (
    CloseSession,
    Filter,
    FilterOptionError,
    FilterOptions,
    IFilterFactory,
    IRequestFilter,
    Metric,
    Refuse,
    RequestHead,
)
from chatproxy.filters import modsecurity
from chatproxy.filters.crs import DEFAULT_CRS, CrsError, CrsInstall, find_crs
from chatproxy.filters.modsecurity import ModSecurity, Outcome, Rules, RulesError, Transaction
from chatproxy.filters.waf_results import (Verdict, announces_body, message_transaction, request_transaction,
                                           response_transaction, verdict)
from chatproxy.filters.waf_setup import RESPONSE_TYPES, SETUP_RULES, Exclusion, WafSettings, load_order, parse_exclusion

log = Logger()

__all__ = ["BLOCKED", "TOO_LARGE", "WafKind", "WebApplicationFirewall", "waf"]

_OPTIONS = ("crs", "paranoia", "inbound_anomaly_threshold", "outbound_anomaly_threshold", "allowed_methods",
            "allowed_content_types", "exclude_rules", "inspect_body_bytes", "inspect_message_bytes", "over_limit",
            "inspect_responses", "inspect_response_bytes", "response_content_types")
BLOCKED = "request blocked by the web application firewall"
RESPONSE_BLOCKED = "response blocked by the web application firewall"
TOO_LARGE = "larger than the web application firewall inspects"
MAX_INSPECT_BYTES = 16 * 1024 * 1024
POOL_THREADS = 2
EXCERPT_CHARS = 100
_T = TypeVar("_T")
_METHOD = re.compile(r"[A-Za-z]+")
_MEDIA = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_INSPECTIONS_HELP = ("Requests, responses and WebSocket messages the waf inspected, by route, what (request, response, "
                     "message) and outcome "
                     "(clean; matched: rules matched, below the threshold; refused: by the engine, or would have been "
                     "in report mode; over_limit: refused for its size).")


def excerpt(value: str, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of ``value`` (``...`` when cut)."""
    return value if len(value) <= limit else value[:limit] + "..."


class _Pool:
    """The process's waf thread pool, started on first use and stopped when
    the reactor shuts down."""

    pool: ThreadPool | None = None

    @classmethod
    def run(cls, work: Callable[[], _T]) -> defer.Deferred[_T]:
        """Run ``work`` in the pool; the Deferred fires in the reactor thread."""
        # Imported here, not with the module: twisted.internet.reactor installs
        # the default reactor, and plugins are imported before twistd installs its own.
        from twisted.internet import reactor

        if cls.pool is None:
            pool = cls.pool = ThreadPool(minthreads=0, maxthreads=POOL_THREADS, name="chatproxy-waf")
            pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", cls._stop)  # type: ignore[attr-defined]
        return deferToThreadPool(cast(IReactorFromThreads, reactor), cls.pool, work)

    @classmethod
    def _stop(cls) -> None:
        pool, cls.pool = cls.pool, None
        if pool is not None:
            pool.stop()


@implementer(IRequestFilter)
class WebApplicationFirewall(Filter):
    """ModSecurity with the CRS on requests, request bodies and WebSocket messages.

    Every transaction runs off the reactor thread through ``offload`` (the
    default is the waf's thread pool, where the engine runs without the GIL;
    tests give one that runs it at once), so the hooks return Deferreds.
    """

    def __init__(self, settings: WafSettings, crs: CrsInstall, *, inspect_message_bytes: int = 64 * 1024,
                 over_limit: str = "pass", engine: ModSecurity | None = None,
                 offload: Callable[[Callable[[], Outcome]], defer.Deferred[Outcome]] | None = None) -> None:
        self.settings = settings
        self.crs = crs
        self.paranoia = settings.paranoia
        self.threshold = settings.inbound_threshold
        self.inspect_body_bytes = settings.inspect_body_bytes
        self.inspect_message_bytes = inspect_message_bytes
        self.over_limit = over_limit
        self.engine = engine if engine is not None else modsecurity.engine()
        self.rules = load_rules(self.engine, settings, crs)
        #: The response rule set (None: responses are not inspected).
        self.response_rules = load_rules(self.engine, settings, crs, responses=True) \
            if settings.inspect_response_bytes else None
        self.inspect_response_bytes = settings.inspect_response_bytes
        self.inspect_response_types = frozenset(t.encode("ascii") for t in settings.response_types)
        self.offload = offload if offload is not None else _Pool.run
        #: Inspections by (route, what: request or message, outcome: clean, matched, refused, over_limit).
        self.inspections: Counter[tuple[str, str, str]] = Counter()
        #: Rule matches by (route, rule id).
        self.rule_matches: Counter[tuple[str, int]] = Counter()

    # -- running the engine

    def run(self, transaction: Transaction) -> Outcome:
        """Run one transaction through the engine, here and now (in this
        thread), on the response rule set if it carries a response."""
        if transaction.response is not None:
            assert self.response_rules is not None, "responses are inspected only with inspect_responses = yes"
            return self.engine.run(self.response_rules, transaction)
        return self.engine.run(self.rules, transaction)

    def inspect(self, transaction: Transaction) -> Verdict:
        """The verdict on one transaction, here and now (in this thread)."""
        return verdict(self.run(transaction))

    def _inspected(self, transaction: Transaction, head: RequestHead, what: str,
                   described: str) -> defer.Deferred[Refuse | None]:
        """Run the transaction off the reactor thread (:attr:`offload`); the
        Deferred fires, in the reactor thread, with the refusal, if any."""
        work = self.offload(lambda: self.run(transaction))
        return work.addCallback(lambda outcome: self._decide(head, what, verdict(outcome), described))

    # -- hooks

    def request(self, head: RequestHead) -> Any:
        """Inspect a request that announces no body (one that does is inspected
        with its body by :meth:`request_body`)."""
        if self.inspect_body_bytes and announces_body(head):
            return None
        return self._inspected(request_transaction(head), head, "request", "")

    def request_body(self, head: RequestHead, body: bytes, complete: bool = True) -> Any:
        """Inspect the head with the first ``inspect_body_bytes`` of the body;
        past that, ``over_limit = refuse`` refuses with 413."""
        limit = self.inspect_body_bytes
        if (not complete or len(body) > limit) and self._over_limit(head, "request", "a request body"):
            return Refuse(413, f"request body {TOO_LARGE}")
        return self._inspected(request_transaction(head, body[:limit]), head, "request", "")

    def response_body(self, head: RequestHead, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                      complete: bool) -> Any:
        """Inspect a response (of the inspected media types: the chain only
        calls this for those) with the first ``inspect_response_bytes`` of its
        body through the response rules; a refusal replaces it (403, the
        engine's status for the outbound anomaly threshold)."""
        if self.response_rules is None:
            return None
        transaction = response_transaction(head, status, headers, body)
        return self._inspected(transaction, head, "response", f"the {status} response to ")

    def message(self, head: RequestHead, payload: bytes, binary: bool, upward: bool) -> Any:
        """Inspect a client-to-upstream text message (at most
        ``inspect_message_bytes`` of it); a refusal closes the session with
        1008, a message over the limit with ``over_limit = refuse`` with 1009."""
        limit = self.inspect_message_bytes
        if binary or not upward or limit == 0:
            return None
        truncated = len(payload) > limit
        if truncated and self._over_limit(head, "message", "a WebSocket message"):
            return CloseSession(1009, f"message {TOO_LARGE}")
        transaction = message_transaction(head, bytes(payload[:limit]), truncated)
        return self._inspected(transaction, head, "message", "a WebSocket message on ").addCallback(
            lambda refusal: None if refusal is None else CloseSession(1008, BLOCKED))

    # -- verdicts

    def _over_limit(self, head: RequestHead, what: str, described: str) -> bool:
        """Whether to refuse what is larger than the inspection limit (logged and counted)."""
        if self.over_limit != "refuse":
            return False
        self.inspections[(head.route, what, "over_limit")] += 1
        log.info("waf: {described} larger than the inspection limit on {method} {target} from {client}: refused "
                 "(over_limit = refuse)", described=described, method=head.method,
                 target=excerpt(head.target), client=head.client)
        return True

    def _decide(self, head: RequestHead, what: str, found: Verdict, described: str) -> Refuse | None:
        """Count and log a verdict; the refusal it makes, if any."""
        outcome = "refused" if found.status is not None else "matched" if found.matches else "clean"
        self.inspections[(head.route, what, outcome)] += 1
        for rule in found.rule_ids:
            self.rule_matches[(head.route, rule)] += 1
        if not found.matches and found.status is None:
            return None
        outbound = what == "response"
        log.info("waf: {verdict} ({direction}anomaly score {score}, threshold {threshold}, paranoia {paranoia}) "
                 "for {what}{method} {target} from {client}: {matches}",
                 verdict=f"refused with {found.status}" if found.status is not None else "passed",
                 direction="outbound " if outbound else "", score=found.score,
                 threshold=self.settings.outbound_threshold if outbound else self.threshold,
                 paranoia=self.paranoia, what=described,
                 method=head.method, target=excerpt(head.target), client=head.client,
                 matches="; ".join(m.describe() for m in found.matches) or "-")
        if found.status is None:
            return None
        rules = ",".join(map(str, found.rule_ids)) or "-"
        if what == "response":
            return Refuse(found.status, RESPONSE_BLOCKED, note=f"outbound_anomaly_score={found.score} rules={rules}")
        return Refuse(found.status, BLOCKED, note=f"anomaly_score={found.score} rules={rules}")

    # -- metrics

    def metrics(self) -> Iterator[Metric]:
        """``chatproxy_waf_inspections`` by route, what and outcome, and
        ``chatproxy_waf_rule_matches`` by route and rule id."""
        for (route, what, outcome), count in sorted(self.inspections.items()):
            yield Metric("chatproxy_waf_inspections", _INSPECTIONS_HELP,
                         (("route", route), ("what", what), ("outcome", outcome)), count)
        for (route, rule), count in sorted(self.rule_matches.items()):
            yield Metric("chatproxy_waf_rule_matches", "Rules of the CRS (and 2000xx, ModSecurity's body checks) that "
                         "matched, by route and rule id.", (("route", route), ("rule", str(rule))), count)


def load_rules(engine: ModSecurity, settings: WafSettings, crs: CrsInstall, responses: bool = False) -> Rules:
    """The rule set of one filter (``responses``: its response rule set):
    setup, CRS files, exclusions.  A piece ModSecurity refuses is a
    FilterOptionError naming the option it comes from."""
    rules = engine.rules()
    for kind, item, option in load_order(settings, crs.files, responses):
        try:
            if kind == "file":
                rules.add_file(item)
            else:
                rules.add_text(item)
        except RulesError as e:
            what = item if kind == "file" else "the configuration"
            raise FilterOptionError(option, f"ModSecurity refused {what}: {e}") from None
    return rules


# ---------------------------------------------------------------------------
# The kind


def parse_exclusions(items: Sequence[str], crs: CrsInstall) -> tuple[Exclusion, ...]:
    """``exclude_rules``: ``ID``, ``tag:TAG``, or either followed by a target;
    each id or tag one the CRS defines."""
    found = []
    for item in items:
        try:
            exclusion = parse_exclusion(item)
        except ValueError as e:
            raise FilterOptionError("exclude_rules", str(e)) from None
        if exclusion.rule is None and exclusion.tag not in crs.tags:
            raise FilterOptionError("exclude_rules", f"unknown tag {exclusion.tag}: no rule of the CRS in "
                                                     f"{crs.rules_dir} (version {crs.version}) has it")
        if exclusion.rule is not None and exclusion.rule not in crs.rule_ids and exclusion.rule not in SETUP_RULES:
            raise FilterOptionError("exclude_rules", f"unknown rule id {exclusion.rule}: the CRS in {crs.rules_dir} "
                                                     f"(version {crs.version}) has no such rule")
        found.append(exclusion)
    return tuple(dict.fromkeys(found))


def words(items: Sequence[str], option: str, form: re.Pattern[str]) -> tuple[str, ...]:
    """The words of a list option (separated by commas, newlines or spaces, as CRS
    writes them), each of ``form``: methods upper-cased, media types lower-cased."""
    found = []
    for word in (w for item in items for w in item.split()):
        if not form.fullmatch(word):
            raise FilterOptionError(option, f"{word!r} is not a {'method' if form is _METHOD else 'media type'}")
        found.append(word.upper() if form is _METHOD else word.lower())
    return tuple(dict.fromkeys(found))


@implementer(IPlugin, IFilterFactory)
class WafKind:
    """The filter kind ``use = waf``."""

    name = "waf"

    def build(self, options: Mapping[str, str]) -> WebApplicationFirewall:
        """Parse the options (all optional), find the CRS and the engine, load the rules."""
        opts = FilterOptions(self.name, options, _OPTIONS)
        path = str(opts.path("crs", DEFAULT_CRS))
        paranoia = opts.integer("paranoia", 1, maximum=4, expected="a paranoia level from 1 to 4")
        inbound = opts.integer("inbound_anomaly_threshold", 5, expected="a whole number of at least 1")
        outbound = opts.integer("outbound_anomaly_threshold", 4, expected="a whole number of at least 1")
        methods = words(opts.items("allowed_methods", (), what="method"), "allowed_methods", _METHOD)
        types = words(opts.items("allowed_content_types", (), what="content type"), "allowed_content_types", _MEDIA)
        body_bytes = opts.size("inspect_body_bytes", 64 * 1024)
        message_bytes = opts.size("inspect_message_bytes", 64 * 1024)
        for option, value in (("inspect_body_bytes", body_bytes), ("inspect_message_bytes", message_bytes)):
            if value > MAX_INSPECT_BYTES:
                raise FilterOptionError(option, "must be at most 16m")
        over_limit = opts.choice("over_limit", ("pass", "refuse"), "pass")
        responses = opts.boolean("inspect_responses", False)
        response_bytes = opts.size("inspect_response_bytes", 64 * 1024, minimum=1)
        if response_bytes > MAX_INSPECT_BYTES:
            raise FilterOptionError("inspect_response_bytes", "must be at most 16m")
        response_types = words(opts.items("response_content_types", RESPONSE_TYPES, what="content type"),
                               "response_content_types", _MEDIA)
        excluded = opts.items("exclude_rules", (), allow_empty=True)
        try:
            crs = find_crs(path)
        except CrsError as e:
            raise FilterOptionError("crs", str(e)) from None
        exclusions = parse_exclusions(excluded, crs)
        try:
            engine = modsecurity.engine()
        except modsecurity.EngineMissing as e:
            raise FilterOptionError("use", str(e)) from None
        settings = WafSettings(paranoia, inbound, outbound, methods, types, body_bytes, exclusions,
                               response_bytes if responses else 0, response_types)
        return WebApplicationFirewall(settings, crs, inspect_message_bytes=message_bytes, over_limit=over_limit,
                                      engine=engine)


waf = WafKind()
