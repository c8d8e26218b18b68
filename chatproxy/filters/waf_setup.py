"""The ModSecurity configuration a ``waf`` filter runs, written from its options (no I/O).

A ``waf`` filter loads, in this order (see :func:`load_order`):

1. :func:`engine_setup`: the engine's own settings, as ModSecurity's
   recommended base configuration has them where they matter to a proxy
   (rule engine on, request bodies read up to the inspection limit, the JSON
   and XML body processors switched on for their content types, a body that
   does not parse refused with 400), the response phases off;
2. :func:`crs_setup`: chatproxy's equivalent of CRS's ``crs-setup.conf``: the
   paranoia level, the anomaly thresholds, and (only when the options set
   them) the allowed methods and request content types;
3. the CRS rule files, as a package installed them (nothing of CRS is here);
4. :func:`exclusions`: rule exclusions by id or by tag, for every target or
   for one, the way CRS users write them after the CRS (``SecRuleRemoveById``,
   ``SecRuleRemoveByTag``, ``SecRuleUpdateTargetById``, ``SecRuleUpdateTargetByTag``), and chatproxy's rule that reports the
   inbound anomaly score in the logging phase (:data:`SCORE_RULE`).

A filter that inspects responses (``inspect_responses = yes``) loads a
second, smaller rule set for them (``load_order(..., responses=True)``):
:func:`response_engine_setup` (response bodies of the inspected media types
read up to their limit, request bodies not read), the same
:func:`crs_setup`, CRS's initialization file and its ``RESPONSE-*`` files
(:func:`response_files`), and the same exclusions with the rule that reports
the outbound anomaly score (:data:`OUTBOUND_SCORE_RULE`).  Response rules
need nothing from the request phases but the initialization, so a response
is inspected as a transaction of its own and no engine state is kept
between a request and its response.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from attrs import frozen

__all__ = ["OUTBOUND_SCORE_RULE", "RESPONSE_TYPES", "SCORE_RULE", "SETUP_RULES", "TAG_RE", "TARGET_RE", "Exclusion",
           "WafSettings", "crs_setup", "engine_setup", "exclusions", "load_order", "parse_exclusion",
           "response_engine_setup", "response_files"]

SCORE_RULE = 99100
"""chatproxy's own rule (a local-use id) that logs the inbound anomaly score."""

OUTBOUND_SCORE_RULE = 99101
"""chatproxy's own rule that logs the outbound anomaly score (responses)."""

SETUP_RULES = frozenset({200000, 200001, 200002, 200003, 900000, 900110, 900200, 900220, 900990, SCORE_RULE,
                         OUTBOUND_SCORE_RULE})
"""The ids of the rules :func:`engine_setup`, :func:`crs_setup` and
:func:`exclusions` write (200000-200003 as in ModSecurity's recommended
configuration, 9000xx as in CRS's crs-setup.conf)."""

TARGET_RE = re.compile(r"(?:[A-Z][A-Z_]*)(?::(?:[^\s\"'|,]+|/[^/\s]+/))?\Z")
"""One ModSecurity target: a collection (``ARGS``, ``REQUEST_COOKIES``, ...)
and optionally a key or a /regex/ (``ARGS:message``, ``ARGS:/^json\\./``)."""

RESPONSE_TYPES = ("text/plain", "text/html", "text/xml")
"""The response media types inspected unless ``response_content_types`` says
otherwise (ModSecurity's recommended ``SecResponseBodyMimeType``)."""

CRS_SETUP_VERSION = 334
"""What ``tx.crs_setup_version`` says: CRS checks only that it is set."""


@frozen
class Exclusion:
    """Rules turned off, for every target (``target`` None) or for one: the
    rule with id ``rule``, or (``rule`` None) every rule tagged ``tag``."""

    rule: int | None
    target: str | None = None
    tag: str | None = None

    def __str__(self) -> str:
        which = str(self.rule) if self.rule is not None else f"tag:{self.tag}"
        return which if self.target is None else f"{which} {self.target}"


@frozen
class WafSettings:
    """What a ``waf`` filter's options say about the rules it runs."""

    paranoia: int = 1
    inbound_threshold: int = 5
    outbound_threshold: int = 4
    allowed_methods: tuple[str, ...] = ()  # empty: CRS's default
    allowed_content_types: tuple[str, ...] = ()  # empty: CRS's default
    inspect_body_bytes: int = 64 * 1024  # 0: request bodies are not read
    exclusions: tuple[Exclusion, ...] = ()
    inspect_response_bytes: int = 0  # 0: responses are not inspected
    response_types: tuple[str, ...] = RESPONSE_TYPES


TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]*\Z")
"""A CRS tag (``attack-sqli``, ``paranoia-level/2``, ``OWASP_CRS``)."""


def parse_exclusion(text: str) -> Exclusion:
    """``942100``, ``942100 ARGS:message``, ``tag:attack-sqli`` or
    ``tag:attack-sqli ARGS:message``; raises ValueError with the reason."""
    parts = text.split()
    if not parts or len(parts) > 2:
        raise ValueError(f"{text!r} is not a rule id, 'tag:TAG', or one of them and a target "
                         "(e.g. 942100 ARGS:message)")
    which, target = parts[0], (parts[1] if len(parts) == 2 else None)
    if target is not None and not TARGET_RE.match(target):
        raise ValueError(f"{target!r} is not a ModSecurity target such as ARGS:message or "
                         "REQUEST_COOKIES:session")
    if which.startswith("tag:"):
        if not TAG_RE.match(which[4:]):
            raise ValueError(f"{which!r} is not a rule tag (e.g. tag:attack-sqli)")
        return Exclusion(None, target, which[4:])
    if not which.isdigit():
        raise ValueError(f"{which!r} is not a rule id (ids are numbers such as 942100; tags are written "
                         "tag:attack-sqli)")
    return Exclusion(int(which), target)


_MULTIPART_ERRORS = "|".join(f"MULTIPART_{flag}" for flag in (
    "BOUNDARY_QUOTED", "BOUNDARY_WHITESPACE", "DATA_BEFORE", "DATA_AFTER", "HEADER_FOLDING", "CRLF_LF_LINES",
    "MISSING_SEMICOLON", "INVALID_QUOTING", "INVALID_PART", "INVALID_HEADER_FOLDING", "FILE_LIMIT_EXCEEDED"))
"""ModSecurity's multipart flags that refuse a body: those of MULTIPART_STRICT_ERROR
but LF_LINE (a body whose lines all end in LF alone is accepted; lines ending
both ways in one body are refused).  MULTIPART_UNMATCHED_BOUNDARY is left out:
libmodsecurity 3.0.9 sets it on well-formed bodies."""


def engine_setup(settings: WafSettings) -> str:
    """The engine's settings (ModSecurity's recommended base configuration,
    where it matters here)."""
    limit = max(settings.inspect_body_bytes, 1)
    body = "On" if settings.inspect_body_bytes > 0 else "Off"
    return f"""
SecRuleEngine On
SecRequestBodyAccess {body}
SecRequestBodyLimit {limit}
SecRequestBodyNoFilesLimit {limit}
SecRequestBodyLimitAction ProcessPartial
SecResponseBodyAccess Off
SecAuditEngine Off
SecArgumentSeparator &
SecCookieFormat 0
SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\\+|/)|text/)xml" \\
    "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "^application/(?:[a-z0-9.-]+\\+)?json" \\
    "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQBODY_ERROR "!@eq 0" \\
    "id:200002,phase:2,t:none,log,deny,status:400,chain,msg:'Failed to parse request body.',\\
    logdata:'%{{reqbody_error_msg}}',severity:2"
    SecRule REQUEST_BODY_LENGTH "@lt {limit}" "t:none"
SecRule {_MULTIPART_ERRORS} \\
    "!@eq 0" "id:200003,phase:2,t:none,log,deny,status:400,chain,\\
    msg:'Multipart request body failed strict validation (line endings may be CRLF or LF).',\\
    logdata:'%{{MATCHED_VAR_NAME}}',severity:2"
    SecRule REQUEST_BODY_LENGTH "@lt {limit}" "t:none"
"""


def response_engine_setup(settings: WafSettings) -> str:
    """The engine's settings for the response rule set: request bodies not
    read (the request rule set did), response bodies of the inspected media
    types read up to ``inspect_response_bytes`` (the rest is not inspected)."""
    return f"""
SecRuleEngine On
SecRequestBodyAccess Off
SecResponseBodyAccess On
SecResponseBodyMimeType {" ".join(settings.response_types)}
SecResponseBodyLimit {max(settings.inspect_response_bytes, 1)}
SecResponseBodyLimitAction ProcessPartial
SecAuditEngine Off
SecArgumentSeparator &
SecCookieFormat 0
"""


def response_files(rule_files: Sequence[str]) -> tuple[str, ...]:
    """The CRS files the response rule set loads: the initialization
    (``REQUEST-901-*``) and the response rules (``RESPONSE-*``) but the
    correlation file (``RESPONSE-980-*``, which reports on the request's
    inbound score)."""
    def wanted(name: str) -> bool:
        return name.startswith("REQUEST-901-") or (name.startswith("RESPONSE-")
                                                   and not name.startswith("RESPONSE-980-"))
    return tuple(path for path in rule_files if wanted(path.rsplit("/", 1)[-1]))


def _quoted(values: Iterable[str]) -> str:
    return " ".join(values).replace("'", "")


def crs_setup(settings: WafSettings) -> str:
    """chatproxy's ``crs-setup.conf``: the paranoia level (CRS 3's and CRS 4's
    names), the anomaly thresholds, the allowed methods and content types
    when the options set them, and the setup version CRS checks for."""
    level = settings.paranoia
    lines = [
        'SecDefaultAction "phase:1,log,auditlog,pass"',
        'SecDefaultAction "phase:2,log,auditlog,pass"',
        f'SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={level},'
        f'setvar:tx.blocking_paranoia_level={level}"',
        f'SecAction "id:900110,phase:1,nolog,pass,t:none,'
        f'setvar:tx.inbound_anomaly_score_threshold={settings.inbound_threshold},'
        f'setvar:tx.outbound_anomaly_score_threshold={settings.outbound_threshold}"',
    ]
    if settings.allowed_methods:
        lines.append(f"SecAction \"id:900200,phase:1,nolog,pass,t:none,"
                     f"setvar:'tx.allowed_methods={_quoted(settings.allowed_methods)}'\"")
    if settings.allowed_content_types:
        types = _quoted(f"|{t.lower()}|" for t in settings.allowed_content_types)
        lines.append(f"SecAction \"id:900220,phase:1,nolog,pass,t:none,setvar:'tx.allowed_request_content_type={types}'\"")
    lines.append(f'SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version={CRS_SETUP_VERSION}"')
    return "\n".join(lines) + "\n"


def exclusions(settings: WafSettings, responses: bool = False) -> str:
    """The exclusions (after the CRS) and the rule that logs the inbound
    anomaly score (``responses``: the outbound one; CRS 3's and CRS 4's
    variable) in the logging phase, which runs whatever the verdict."""
    lines = []
    for exclusion in settings.exclusions:
        by, which = ("Id", str(exclusion.rule)) if exclusion.rule is not None else ("Tag", f'"{exclusion.tag}"')
        if exclusion.target is None:
            lines.append(f"SecRuleRemoveBy{by} {which}")
        else:
            lines.append(f'SecRuleUpdateTargetBy{by} {which} "!{exclusion.target}"')
    variables, rule, which = ("TX:OUTBOUND_ANOMALY_SCORE|TX:BLOCKING_OUTBOUND_ANOMALY_SCORE", OUTBOUND_SCORE_RULE,
                              "outbound") if responses else \
        ("TX:ANOMALY_SCORE|TX:BLOCKING_INBOUND_ANOMALY_SCORE", SCORE_RULE, "inbound")
    lines.append(f'SecRule {variables} "@gt 0" '
                 f"\"id:{rule},phase:5,pass,t:none,log,msg:'chatproxy: {which} anomaly score',"
                 f"logdata:'%{{MATCHED_VAR}}'\"")
    return "\n".join(lines) + "\n"


def load_order(settings: WafSettings, rule_files: Sequence[str],
               responses: bool = False) -> Sequence[tuple[str, str, str | None]]:
    """What a filter loads, in order (``responses``: for its response rule
    set): ``(kind, what, option)`` with kind ``text`` (directives) or
    ``file`` (a path), and the option whose value the piece comes from
    (None: the options as a whole)."""
    setup = response_engine_setup(settings) if responses else engine_setup(settings)
    files = response_files(rule_files) if responses else rule_files
    return ([("text", setup, None), ("text", crs_setup(settings), None)]
            + [("file", path, "crs") for path in files]
            + [("text", exclusions(settings, responses), "exclude_rules")])
