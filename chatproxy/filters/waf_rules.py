"""The rule table of the ``waf`` filter kind, and the transformations its rules match on.

The rules follow the OWASP Core Rule Set (CRS): anomaly scoring, paranoia
levels, the CRS id ranges (920 protocol enforcement, 921 protocol attacks,
930 local file inclusion, 932/933/934/944 remote code execution, 941 XSS,
942 SQL injection) and, where a rule covers the same attack as a CRS rule,
the CRS id. Rules of chatproxy's own (no CRS counterpart, or a CRS rule
changed enough to deserve another number) have ``9`` as their fourth digit,
e.g. 941901. Each rule lists the transformations of a value it matches on
(CRS ``t:`` actions); a value is transformed at most once per name.

Nothing here depends on Twisted: :mod:`chatproxy.filters.waf` evaluates the
table on a request's targets.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from attrs import frozen

# ---------------------------------------------------------------------------
# Severities and categories (the CRS anomaly scores)

SEVERITY_SCORES = {"critical": 5, "error": 4, "warning": 3, "notice": 2}
CATEGORIES = ("sqli", "xss", "lfi", "rce", "protocol")

# Target kinds: what part of a request a value comes from.
#   path    the request path (REQUEST_FILENAME), percent-decoded once
#   arg     argument values: query, body fields, JSON string values, WebSocket text
#   name    argument names: query/body field names, JSON keys, cookie names
#   cookie  cookie values
#   header  request header values, except User-Agent/Referer and the excluded ones
#   ua      the User-Agent and Referer header values
ARGS = frozenset({"arg", "name", "cookie"})
ALL = frozenset({"path", "arg", "name", "cookie", "header", "ua"})


# ---------------------------------------------------------------------------
# Transformations


_PERCENT = re.compile(r"%(?:[uU]([0-9a-fA-F]{4})|([0-9a-fA-F]{2}))")
_PERCENT_BYTES = re.compile(r"(?:%[0-9a-fA-F]{2})+")
# Overlong UTF-8 (``%c0%af`` is ``/`` to a lax decoder): 2 and 3 byte forms,
# as left by ``surrogateescape`` decoding.
_OVERLONG2 = re.compile("[\udcc0\udcc1][\udc80-\udcbf]")
_OVERLONG3 = re.compile("\udce0[\udc80-\udc9f][\udc80-\udcbf]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def decode_bytes(data: bytes) -> str:
    """Bytes to text as a lax server would: UTF-8, overlong forms decoded to the
    character they encode, any other invalid byte taken as Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", "surrogateescape")
    text = _OVERLONG2.sub(lambda m: chr(((ord(m.group()[0]) & 0x1F) << 6) | (ord(m.group()[1]) & 0x3F)), text)
    text = _OVERLONG3.sub(lambda m: chr(((ord(m.group()[1]) & 0x3F) << 6) | (ord(m.group()[2]) & 0x3F)), text)
    return _ESCAPED_BYTE.sub(lambda m: chr(ord(m.group()) - 0xDC00), text)


def url_decode(text: str, plus: bool = False) -> str:
    """One percent-decoding pass (``%XX`` runs decoded as UTF-8 by
    :func:`decode_bytes`); ``+`` becomes a space when ``plus`` (query strings and
    form bodies). ``%uXXXX`` is left alone: that is :func:`url_decode_uni`."""
    if plus:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    return _PERCENT_BYTES.sub(lambda m: decode_bytes(bytes.fromhex(m.group().replace("%", ""))), text)


def url_decode_uni(text: str) -> str:
    """CRS ``t:urlDecodeUni``: ``%XX`` and the IIS ``%uXXXX`` form. ``+`` is kept."""
    if "%" not in text:
        return text
    text = re.sub(r"%[uU]([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    return url_decode(text)


def fully_url_decoded(text: str, passes: int = 3) -> str:
    """Percent-decode until nothing changes (at most ``passes`` times): the
    double- and triple-encoded forms of an attack become the attack."""
    for _ in range(passes):
        if "%" not in text:
            break
        decoded = url_decode_uni(text)
        if decoded == text:
            break
        text = decoded
    return text


def unicode_fold(text: str) -> str:
    """NFKC normalisation: full-width and compatibility forms (``＜``, ``．``,
    ``ｓｃｒｉｐｔ``) become the ASCII characters browsers and servers may map them to."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", text)


_JS_ESCAPE = re.compile(r"\\(?:u\{?([0-9a-fA-F]{4})\}?|x([0-9a-fA-F]{2}))")


def js_decode(text: str) -> str:
    """CRS ``t:jsDecode`` (the part that matters): ``\\uXXXX`` and ``\\xHH`` escapes."""
    if "\\" not in text:
        return text
    return _JS_ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), text)


def html_decode(text: str) -> str:
    """CRS ``t:htmlEntityDecode``: named and numeric entities (with or without
    the ``;``), twice, so ``&amp;lt;`` is ``<`` as well."""
    for _ in range(2):
        if "&" not in text:
            break
        text = html.unescape(text)
    return text


_WHITESPACE = re.compile(r"\s+")


def sql_compact(text: str) -> str:
    """CRS ``t:replaceComments`` + ``t:compressWhitespace`` on lower-cased text:
    ``/**/`` becomes a space; a MySQL executable comment ``/*!50000union*/``
    becomes its content; an unterminated ``/*`` is kept. (Done with ``find``,
    not a regular expression: linear on any input.)"""
    if "/*" in text:
        parts: list[str] = []
        index = 0
        while True:
            start = text.find("/*", index)
            end = text.find("*/", start + 2) if start >= 0 else -1
            if end < 0:
                parts.append(text[index:])
                break
            inner = text[start + 2 : end]
            parts.append(text[index:start])
            parts.append(" " + inner[1:].lstrip("0123456789") + " " if inner.startswith("!") else " ")
            index = end + 2
        text = "".join(parts)
    return _WHITESPACE.sub(" ", text)


_CMD_IFS = re.compile(r"\$(?:\{ifs\}|ifs\b)")
_CMD_BRACES = re.compile(r"\{([a-z0-9_./-]+),([^{}\s]*)\}")


def cmd_line(text: str) -> str:
    """CRS ``t:cmdLine``, in spirit: what a shell would run. On lower-cased text:
    the quotes, backslashes and carets a shell drops inside a word are removed
    (``c'a't``, ``c\\at``, ``w^hoami``), ``$IFS`` is a space, ``{cat,/etc/passwd}``
    is ``cat /etc/passwd``, a run of whitespace is one space (one line break if
    it has one: a line break separates shell commands)."""
    text = _CMD_IFS.sub(" ", text)
    if "{" in text:
        text = _CMD_BRACES.sub(lambda m: m.group(1) + " " + m.group(2).replace(",", " "), text)
    text = re.sub(r"[\\\"'^]", "", text)
    return _WHITESPACE.sub(_one_space_or_newline, text)


def _one_space_or_newline(match: re.Match[str]) -> str:
    return "\n" if "\n" in match.group() or "\r" in match.group() else " "


# Characters that some servers and runtimes take for a slash or a backslash.
_SLASH_LOOKALIKES = str.maketrans({"\u2215": "/", "\u2044": "/", "\u29f8": "/", "\u2216": "/", "\u29f5": "/",
                                   "\\": "/", "\x00": None})
_DOT_SEGMENT = re.compile(r"(?:(?<=/)|^)\./")


def path_normal(text: str) -> str:
    """CRS ``t:normalisePathWin`` without resolving ``..`` (so traversal stays
    visible): backslashes and slash look-alikes become ``/``, NULs go, repeated
    slashes and ``./`` segments are removed."""
    text = text.translate(_SLASH_LOOKALIKES)
    text = re.sub(r"/{2,}", "/", text)
    for _ in range(8):
        if "./" not in text:
            break
        previous, text = text, _DOT_SEGMENT.sub("", text)
        if text == previous:
            break
    return text


class Value:
    """One inspected value and its transformations, each computed once.

    ``raw`` is the value as the application would see it (already decoded once
    by the query or body parser). Transformation names:

    - ``raw``: as is.
    - ``decoded``: percent-decoded until stable (``%XX``, ``%uXXXX``, overlong
      UTF-8), then NFKC-folded.
    - ``lower``: ``decoded``, lower-cased, NULs removed (line breaks kept).
    - ``compact``: ``lower`` with whitespace compressed.
    - ``html``: ``decoded``, JS escapes and HTML entities decoded, lower-cased,
      NULs removed, whitespace compressed.
    - ``html_tight``: ``html`` without the control characters and whitespace
      browsers ignore inside a URL scheme (``jav&#x09;ascript:``).
    - ``sql``: ``compact`` with SQL comments replaced.
    - ``cmd``: ``lower`` through :func:`cmd_line`.
    - ``path``: ``lower`` through :func:`path_normal`.
    - ``crlf``: ``lower`` with characters whose low byte is CR or LF as a line
      break, runs of spaces as one space, runs of line breaks as one (two if
      there was a blank line); empty if there is no line break at all.
    """

    __slots__ = ("raw", "_cache")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self._cache: dict[str, str] = {}

    def get(self, name: str) -> str:
        """The value under transformation ``name``."""
        cached = self._cache.get(name)
        if cached is None:
            cached = self._cache[name] = TRANSFORMS[name](self)
        return cached


def _decoded(value: Value) -> str:
    return unicode_fold(fully_url_decoded(value.raw))


def _lower(value: Value) -> str:
    return value.get("decoded").lower().replace("\x00", "")


def _html(value: Value) -> str:
    text = unicode_fold(html_decode(js_decode(value.get("decoded"))))
    return _WHITESPACE.sub(" ", text.lower().replace("\x00", ""))


_LOW_BYTE_NEWLINE = re.compile(r"[^\x00-\xff]")
_SPACES = re.compile(r"[^\S\r\n]+")
_LINE_BREAKS = re.compile(r"(?: ?(?:\r\n|\r|\n))+")


def _crlf(value: Value) -> str:
    text = value.get("lower")
    if not text.isascii():
        # Some runtimes keep only the low byte of a character: U+560A is "\n".
        text = _LOW_BYTE_NEWLINE.sub(lambda m: "\n" if ord(m.group()) & 0xFF in (0x0A, 0x0D) else m.group(), text)
    if "\n" not in text and "\r" not in text:
        return ""
    text = _SPACES.sub(" ", text)
    return _LINE_BREAKS.sub(lambda m: "\n\n" if len(m.group().replace(" ", "").replace("\r\n", "\n")) > 1 else "\n",
                            text)


TRANSFORMS: dict[str, Callable[[Value], str]] = {
    "raw": lambda value: value.raw,
    "decoded": _decoded,
    "lower": _lower,
    "compact": lambda value: _WHITESPACE.sub(" ", value.get("lower")),
    "html": _html,
    "html_tight": lambda value: re.sub(r"[\x00-\x20]", "", value.get("html")),
    "sql": lambda value: sql_compact(value.get("lower")),
    "cmd": lambda value: cmd_line(value.get("lower")),
    "path": lambda value: path_normal(value.get("lower")),
    "crlf": _crlf,
}


# ---------------------------------------------------------------------------
# Rules


@frozen
class Rule:
    """One detection rule.

    ``pattern`` is searched in each of ``transforms`` of a value; or ``check``
    is called with the :class:`Value` and returns the matched text (or None)
    -- or, for the request-level protocol rules, both are None and the filter
    checks the request head itself. ``targets`` are the target kinds the rule
    inspects at paranoia level 1 (from level 2 on, every attack rule inspecting
    arguments also inspects the header values).
    """

    id: int
    category: str
    paranoia: int
    severity: str
    message: str
    targets: frozenset[str] = ARGS
    transforms: tuple[str, ...] = ("lower",)
    pattern: re.Pattern[str] | None = None
    check: Callable[[Value], str | None] | None = None

    @property
    def score(self) -> int:
        """The anomaly score a match adds."""
        return SEVERITY_SCORES[self.severity]

    def match(self, value: Value) -> str | None:
        """The matched text in ``value``, or None."""
        if self.check is not None:
            return self.check(value)
        if self.pattern is None:
            return None
        for name in self.transforms:
            found = self.pattern.search(value.get(name))
            if found is not None:
                return found.group()
        return None


def _re(pattern: str) -> re.Pattern[str]:
    """Compile a rule pattern: verbose, so patterns can be laid out and commented."""
    return re.compile(pattern, re.X | re.S)


RULES: list[Rule] = []


def rule(id: int, category: str, paranoia: int, severity: str, message: str, pattern: str | None = None, *,
         targets: frozenset[str] = ARGS, transforms: tuple[str, ...] = ("lower",),
         check: Callable[[Value], str | None] | None = None) -> Rule:
    """Add a rule to the table (ids are unique)."""
    assert category in CATEGORIES and severity in SEVERITY_SCORES and 1 <= paranoia <= 4
    assert all(existing.id != id for existing in RULES), id
    made = Rule(id, category, paranoia, severity, message, targets, transforms,
                _re(pattern) if pattern is not None else None, check)
    RULES.append(made)
    return made


# ---------------------------------------------------------------------------
# libinjection (optional): the CRS rules 942100 and 941100

_libinjection: Any = None
_libinjection_loaded = False


def libinjection() -> Any:
    """The ``libinjection`` module of the optional ``libinjection-python``
    package, or None when it is not installed (imported once)."""
    global _libinjection, _libinjection_loaded
    if not _libinjection_loaded:
        _libinjection_loaded = True
        try:
            import importlib

            module = importlib.import_module("libinjection")
            module.is_sql_injection("1")
            module.is_xss("1")
            _libinjection = module
        except Exception:
            _libinjection = None
    return _libinjection


def _clean_for_c(text: str) -> str:
    # The binding encodes to UTF-8: lone surrogates cannot be; NULs end C strings.
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


def _libinjection_sqli(value: Value) -> str | None:
    module = libinjection()
    if module is None:
        return None
    text = _clean_for_c(value.get("decoded"))
    if not text:
        return None
    result = module.is_sql_injection(text)
    if result.get("is_sqli"):
        fingerprint = result.get("fingerprint", "")
        if isinstance(fingerprint, bytes):
            fingerprint = fingerprint.decode("ascii", "replace")
        return f"fingerprint {fingerprint}"
    return None


def _libinjection_xss(value: Value) -> str | None:
    module = libinjection()
    if module is None:
        return None
    for name in ("decoded", "html"):
        text = _clean_for_c(value.get(name))
        if text and module.is_xss(text).get("is_xss"):
            return "XSS data"
    return None


LIBINJECTION_RULES = (942100, 941100)

# ---------------------------------------------------------------------------
# 942: SQL injection

rule(942100, "sqli", 1, "critical", "SQL Injection Attack Detected via libinjection", check=_libinjection_sqli)

_SQL_OPERAND = r"(?:\d+(?:\.\d+)?|0x[0-9a-f]+|'[^']*'|\"[^\"]*\"|true|false|null)"
_SQL_COMPARE = r"(?:={1,2}|<=>|<>|!=|<=|>=|<|>)"

rule(942140, "sqli", 1, "critical", "SQL Injection Attack: Common DB Names Detected", r"""
    \b(?: information_schema | mysql\.(?:user|db|tables_priv|columns_priv) | sys(?:objects|columns|users|logins)
        | sys\.(?:objects|tables|columns|databases|sql_logins) | pg_(?:catalog|shadow|user|tables|namespace|database)
        | sqlite_(?:temp_)?master | msys(?:access)?objects | all_tables | user_tables | dba_users
        | master\.\.sys\w* | v\$version )\b""", transforms=("sql",))

rule(942151, "sqli", 1, "critical", "SQL Injection Attack: SQL function name detected", r"""
    \b(?: (?:version|database|current_user|session_user|system_user|user|schema|current_database)\s*\(\s*\)
        | (?:extractvalue|updatexml|load_file|group_concat|json_extract|make_set|name_const|elt|hex|unhex
           |dbms_pipe\.receive_message|dbms_xmlgen\.getxml|utl_inaddr\.get_host_\w+|utl_http\.request
           |ctxsys\.drithsx\.sn|xmltype|pg_read_file|pg_ls_dir|lo_import|sys_eval|sys_exec)\s*\(
        | procedure\s+analyse\s*\(
        | ch(?:a)?r\s*\(\s*\d+\s*(?:,\s*\d+\s*)+\)
        | (?:mid|substr(?:ing)?|ascii|ord|length)\s*\(\s*(?:\(?\s*select\b|version|database|user|@@)
        | exp\s*\(\s*~ )""", transforms=("sql",))

rule(942160, "sqli", 1, "critical", "Detects blind sqli tests using sleep() or benchmark()", r"""
    \b(?: sleep\s*\(\s*[\d.(]
        | benchmark\s*\(\s*\d+\s*,
        | pg_sleep\s*\(
        | waitfor\s+(?:delay|time)\s+['"\d]
        | dbms_lock\.sleep\s*\(
        | randomblob\s*\(\s*\d{5,} )""", transforms=("sql",))

rule(942180, "sqli", 1, "critical", "Detects basic SQL authentication bypass attempts 1/3 (quote, boolean operator)", r"""
    ['"`]\)*\s*(?:(?:x?or|and|div)\b|\|\||&&)\s*(?:not\s+)?\(*\s*
    (?: ['"`]?[\w@.$%]*['"`]?\s*(?:""" + _SQL_COMPARE + r"""|\blike\b|\bregexp\b|\brlike\b|\bsounds\s+like\b|\bin\s*\(|\bbetween\b)
      | (?:true|false|null)\s*(?:--|\#|/\*|;|\)|$)
      | \d+\s*(?:--|\#|/\*|;|$)
      | (?:select|exists)\s*\(
      | ['"`]{2}\s*[-+*/|=]?\s*['"`]
      | [a-z_][\w.]*\( )""", transforms=("sql",))

rule(942260, "sqli", 1, "critical", "Detects basic SQL authentication bypass attempts 2/3 (quote, comment)", r"""
      ['"`]\s*\)*\s*(?:--[\s+-]*|\#|/\*.*)$
    | ['"`]\s*=\s*\d*\s*(?:--|\#)
    | ['"`]\s*;\s*(?:--|\#|/\*) """, transforms=("lower",))

rule(942330, "sqli", 1, "critical", "Detects classic SQL injection probings (boolean comparison of literals)", r"""
    (?:\b(?:x?or|and|having|where)|\|\||&&)\s+\(*\s*""" + _SQL_OPERAND + r"""\s*""" + _SQL_COMPARE + r"""\s*
    (?: \(*\s*select\b
      | \(*\s*['"][^'"]*$
      | \(*\s*""" + _SQL_OPERAND + r"""\s*(?=$|--|\#|/\*|;|\)|['"`]|\b(?:x?or|and|limit|union|order|group|having|into|procedure)\b))
    """, transforms=("sql",))

_FROM_CLAUSE = r"""\bfrom\s+[\w.`\[\]$]+\s*(?:$|;|--|\#|/\*|\)|,|\b(?:where|limit|order|group|union|join|into|as)\b)"""

rule(942350, "sqli", 1, "critical", "Detects stacked SQL queries and data/structure manipulation attempts", r"""
    ;\s*(?: drop\s+(?:table|database|schema|view|user|index|procedure|function)\b
          | delete\s+from\b | insert\s+into\b | update\s+[\w.`\[\]]+\s+set\b
          | truncate\s+(?:table\s+)?[\w.`]+\s*(?:$|;|--|\#)
          | alter\s+(?:table|user|database|login)\b
          | create\s+(?:table|user|database|function|procedure|login|trigger)\b
          | exec(?:ute)?\s*(?:\(|master\.|xp_|sp_|@|immediate\b)
          | declare\s+@ | shutdown\s*(?:--|\#|;|/\*|$)
          | select\s+(?:\*|\d|@@|null\b|case\b|(?:pg_)?sleep|benchmark|[\w.]+\s*\()
          | select\b.{0,300}?""" + _FROM_CLAUSE + r""")""", transforms=("sql",))

rule(942360, "sqli", 1, "critical", "Detects SQL file access (load_file, into outfile/dumpfile)", r"""
    \binto\s+(?:out|dump)file\b | \bload\s*_\s*file\s*\( | \bload\s+data\s+(?:local\s+)?infile\b
    | \bcopy\s+\w+\s+(?:from|to)\s+(?:program\b|')""", transforms=("sql",))

rule(942370, "sqli", 1, "critical", "Detects SQL statements and subqueries (SELECT ... FROM)", r"""
      \bselect\s+(?:(?:distinct|all|top\s+\d+)\s+)?
        (?:\*|@@\w+|null\b|\d+\b|[\w.`]+\s*\([^)]{0,300}\)|[\w.`]+\s*,\s*[\w.`(*]+)[^;]{0,300}?""" + _FROM_CLAUSE + r"""
    | \bselect\s+[\w.`]+\s+from\s+[\w.`\[\]]+\s+where\s+[\w.`]+\s*(?:=|<|>|\blike\b|\bin\b)
    | \(\s*select\s+(?:\*|\d|@@|null\b|\(|case\b|[\w.`]+\s*\(|[\w.`]+\s+from\b)
    | \bexists\s*\(\s*select\b
    | \(\s*case\s+when\b""", transforms=("sql",))

rule(942380, "sqli", 1, "critical", "SQL Injection Attack (ORDER BY / GROUP BY / HAVING probing)", r"""
      (?:['"`)\d]\s*)(?:order|group)\s+by\s+(?:\d+(?:\s*,\s*\d+)*\s*(?:$|--|\#|/\*|;|\)|\+)|[\w.`]+(?:\s*,\s*[\w.`]+)*\s+having\b)
    | \bhaving\s+\(*\s*""" + _SQL_OPERAND + r"""\s*""" + _SQL_COMPARE, transforms=("sql",))

rule(942270, "sqli", 1, "critical", "Looking for basic sql injection. Common attack string (UNION SELECT)", r"""
    \bunion(?:[\s+(]|/\*.*?\*/)*(?:all|distinct)?(?:[\s+(]|/\*.*?\*/)*select\b""", transforms=("sql",))

rule(942190, "sqli", 1, "critical", "Detects MSSQL code execution and information gathering attempts", r"""
    \b(?:xp_cmdshell|xp_regread|xp_regwrite|xp_dirtree|xp_fileexist|sp_configure|sp_executesql|sp_oacreate
        |sp_makewebtask|sp_addlogin|sp_addsrvrolemember|openrowset|opendatasource)\b
    | \bexec(?:ute)?\s+master\.\.
    | @@(?:version|servername|hostname|datadir|basedir|identity|language|spid|tmpdir)\b""", transforms=("sql",))

rule(942290, "sqli", 1, "critical", "Finds basic MongoDB SQL injection attempts", r"""
      \[\s*\$(?:ne|eq|lte?|gte?|n?in|not|nor|or|and|regex|where|exists|elemmatch|type|size|all|mod|expr|text)\s*\]
    | ['"]\$(?:ne|eq|lte?|gte?|n?in|not|nor|or|and|regex|where|exists|elemmatch|expr|function)['"]\s*:
    | (?:^|[{,\s])\$where\s*:
    | ['"]\s*;\s*return\s+(?:true|false|1|this|db\.)
    | ['"]\s*\|\|\s*['"]?\w+['"]?\s*===?""", transforms=("lower",))

rule(942500, "sqli", 1, "critical", "MySQL in-line comment detected", r"""
    /\*[!+]\d*\s*\w | \w/\*\*/\w""", transforms=("lower",))

rule(942150, "sqli", 2, "critical", "SQL Injection Attack: SQL function name detected (generic)", r"""
    \b(?:concat(?:_ws)?|char|chr|ascii|ord|hex|substring|substr|mid|left|right|length|len|count|cast|convert|if
        |ifnull|isnull|nullif|coalesce|md5|sha1|rand|floor|iif|instr|locate|position|reverse|lower|upper|trim)
    \s*\(""", transforms=("sql",))

rule(942130, "sqli", 2, "critical", "SQL Injection Attack: SQL Boolean-based attack (tautology)", r"""
    ['"]?\b(\w+)\b['"]?\s*(?:={1,2}|<=>|\blike\b|\bis\b)\s*['"]?\b\1\b""", transforms=("sql",))

rule(942200, "sqli", 2, "critical", "Detects SQL keywords in sequence (SELECT/INSERT/UPDATE/DELETE statements)", r"""
    \bselect\b.{1,100}?\bfrom\b | \binsert\s+into\b | \bdelete\s+from\b | \bupdate\s+\w+\s+set\b
    | \bdrop\s+(?:table|database)\b""", transforms=("sql",))

rule(942440, "sqli", 2, "critical", "SQL Comment Sequence Detected", r"""
    /\*!? | \*/ | ['";]-- | --[\s] | --$ | [^&\-\w\s]\#\S{0,100}\s""", transforms=("lower",))

_SPECIALS = r"""[~!@\#$%^&*()\-+={}\[\]|:;"'´’‘`<>]"""
rule(942430, "sqli", 2, "warning", "Restricted SQL Character Anomaly Detection: 12 or more special characters",
     r"(?:" + _SPECIALS + r"[^~!@\#$%^&*()\-+={}\[\]|:;\"'´’‘`<>]*?){12}", transforms=("raw",))
rule(942431, "sqli", 3, "warning", "Restricted SQL Character Anomaly Detection: 6 or more special characters",
     r"(?:" + _SPECIALS + r"[^~!@\#$%^&*()\-+={}\[\]|:;\"'´’‘`<>]*?){6}", transforms=("raw",))
rule(942432, "sqli", 4, "warning", "Restricted SQL Character Anomaly Detection: 2 or more special characters",
     r"(?:" + _SPECIALS + r"[^~!@\#$%^&*()\-+={}\[\]|:;\"'´’‘`<>]*?){2}", transforms=("raw",))
rule(942460, "sqli", 3, "warning", "Meta-Character Anomaly Detection Alert - Repetitive Non-Word Characters",
     r"\W{4}", transforms=("raw",))


# ---------------------------------------------------------------------------
# 941: cross-site scripting (also inspected in the path and in all inspected headers)

XSS_TARGETS = ALL

rule(941100, "xss", 1, "critical", "XSS Attack Detected via libinjection", targets=XSS_TARGETS,
     check=_libinjection_xss)

rule(941110, "xss", 1, "critical", "XSS Filter - Category 1: Script Tag Vector", r"""
    <\s*/?\s*script\b | <\s*script\s*$""", targets=XSS_TARGETS, transforms=("html",))

_EVENTS = r"""(?:abort|activate|after\w+|animation\w+|auxclick|before\w+|begin|blur|bounce|cancel|canplay\w*|change
    |click|close|contextmenu|copy|cuechange|cut|dblclick|drag\w*|drop|durationchange|emptied|end|ended|error|finish
    |focus\w*|formdata|fullscreen\w*|hashchange|input|invalid|key\w+|load\w*|message\w*|mouse\w+|mozfullscreen\w*
    |page\w+|paste|pause|play\w*|pointer\w+|popstate|progress|propertychange|ratechange|readystatechange|repeat|reset
    |resize|scroll\w*|search|seek\w+|select\w*|show|stalled|start|storage|submit|suspend|timeupdate|toggle|touch\w+
    |transition\w+|unload|volumechange|waiting|webkit\w+|wheel|zoom)"""

rule(941120, "xss", 1, "critical", "XSS Filter - Category 2: Event Handler Vector", r"""
    (?:^|[\s"'`;/=,(<])on""" + _EVENTS + r"""\s*=""", targets=XSS_TARGETS, transforms=("html",))

rule(941130, "xss", 1, "critical", "XSS Filter - Category 3: Attribute Vector", r"""
    \bxlink\s*:\s*href\b | \bformaction\s*= | \bsrcdoc\s*= | <!\s*entity\b | \ballowscriptaccess\b
    | \b(?:href|src|data|action|background|poster|code|codebase|dynsrc|lowsrc)\s*=\s*['"`]?\s*(?:javascript|vbscript|livescript|data)\s*:
    """, targets=XSS_TARGETS, transforms=("html", "html_tight"))

rule(941140, "xss", 1, "critical", "XSS Filter - Category 4: CSS/style vector", r"""
    \bstyle\s*=[^<>]{0,300}?(?:expression\s*\(|url\s*\(\s*['"]?\s*(?:javascript|vbscript|data)\s*:|behavior\s*:)
    | -moz-binding\s*: | @import\s+(?:url\s*\(|['"])""", targets=XSS_TARGETS, transforms=("html",))

rule(941160, "xss", 1, "critical", "NoScript XSS InjectionChecker: HTML Injection", r"""
    <\s*/?\s*(?:script|form|style|svg|marquee|link|object|embed|applet|audio|animate|param|i?frame|frameset|base
              |body|meta|img|image|video|isindex|math|xml|import|bgsound|layer|ilayer)(?:[^\w>-]|>|$)""",
     targets=XSS_TARGETS, transforms=("html",))

rule(941170, "xss", 1, "critical", "NoScript XSS InjectionChecker: Attribute Injection (javascript: and data: URIs)", r"""
    (?:^|[^\w])(?:java|vb|live|mocha)script:
        (?:[^\s]|\s*(?:void|alert|eval|document|window|this|location|prompt|confirm|fetch|top|self|parent)\b)
    | \bdata:(?:text/html|text/xml|text/javascript|image/svg\+xml|application/(?:x-)?(?:javascript|xhtml\+xml|ecmascript))[;,]
    """, targets=XSS_TARGETS, transforms=("html_tight",))

rule(941180, "xss", 1, "critical", "Node-Validator Blacklist Keywords", r"""
    \bdocument\.(?:cookie|domain|write|location|body\.innerhtml)\b | \.(?:parentnode|innerhtml|outerhtml)\b
    | \bwindow\.(?:location|name|open)\b | <!\[cdata\[ | <!--\s*< """, targets=XSS_TARGETS, transforms=("html",))

rule(941350, "xss", 1, "critical", "UTF-7 Encoding IE XSS - Attack Detected", r"""
    \+adw-[^+<>]{0,200}(?:\+ad4-|>) | <[^+<>]{0,200}\+ad4- """, targets=XSS_TARGETS, transforms=("lower",))

rule(941370, "xss", 1, "critical", "JavaScript global variable found", r"""
    \b(?:self|document|this|top|window|parent|frames|globalthis|content)\s*(?:/\*.{0,100}?\*/\s*)*\[\s*['"`]""",
     targets=XSS_TARGETS, transforms=("html",))

rule(941380, "xss", 1, "critical", "AngularJS client side template injection detected", r"""
    \{\{[^{}]{0,300}?(?:constructor|\$eval|\$on\b|\$emit|__proto__|\[\s*['"]|\(\s*['"`)]|\btoString\b)[^{}]{0,300}\}\}
    | \{\{\s*\d+\s*[*+/-]\s*\d+\s*\}\}""", targets=XSS_TARGETS, transforms=("html",))

rule(941390, "xss", 1, "critical", "Javascript method detected", r"""
    \b(?:eval|settimeout|setinterval|alert|prompt|confirm|atob)
        (?:\s*\(\s*(?:['"`\d\[]|document\b|window\b|this\b|atob\b|string\.|top\b|self\b|[a-z_$][\w$.]*\s*\()|`)
    | \bnew\s+function\s*\( | \bstring\s*\.\s*fromcharcode\s*\( | \bfunction\s*\(\s*\)\s*\{[^}]{0,500}\}\s*\(\s*\)
    | \$\{[^}(]{0,300}\([^}]{0,300}\}""", targets=XSS_TARGETS, transforms=("html",))

rule(941901, "xss", 1, "critical", "Non-alphanumeric JavaScript (JSFuck) detected", r"""
    (?:!\[\]|\+\[\]|\[\]\[)[\[\]()!+]{6,}""", targets=XSS_TARGETS, transforms=("compact",))

rule(941320, "xss", 2, "critical", "Possible XSS Attack Detected - HTML Tag Handler", r"""
    <\s*/?\s*[a-z][\w:-]*[^<>]{0,500}?\s[\w:-]+\s*=\s*[^\s>]""", targets=XSS_TARGETS, transforms=("html",))

rule(941381, "xss", 2, "critical", "Client side template expression detected", r"""
    \{\{[^{}]{0,300}\}\} | \$\{[^{}]{0,300}\}""", targets=XSS_TARGETS, transforms=("html",))

rule(941330, "xss", 3, "critical", "IE XSS Filters / HTML markup - any tag", r"""
    <\s*[a-z!/?]""", targets=XSS_TARGETS, transforms=("html",))


# ---------------------------------------------------------------------------
# 930: path traversal and local file inclusion

LFI_TARGETS = frozenset({"path", "arg", "name", "cookie", "header"})

_DOT = r"(?:%2e|%c0%ae|%e0%80%ae|%u002e|%uff0e|%252e|\.)"
_SLASH = r"(?:%2f|%5c|%c0%af|%e0%80%af|%c1%9c|%c1%1c|%u2215|%u2216|%uff0f|%uff3c|%252f|%255c|/|\\)"
_ENCODED_TRAVERSAL = re.compile(_DOT + _DOT + _SLASH + "|" + _SLASH + _DOT + _DOT + r"(?:" + _SLASH + "|$)", re.I)


def _encoded_traversal(value: Value) -> str | None:
    for text in (value.raw, value.get("decoded") if "%" in value.raw else ""):
        for found in _ENCODED_TRAVERSAL.finditer(text):
            if "%" in found.group():
                return found.group()
    return None


rule(930100, "lfi", 1, "critical", "Path Traversal Attack (/../) or (/.../) (encoded)", targets=LFI_TARGETS,
     check=_encoded_traversal)

rule(930110, "lfi", 1, "critical", "Path Traversal Attack (/../) or (/.../)", r"""
    (?:^|[/;])\.{2,}[/;] | [/;]\.{2,}$ """, targets=LFI_TARGETS, transforms=("path",))

rule(930120, "lfi", 1, "critical", "OS File Access Attempt", r"""
    (?: etc/(?:passwd|shadow|g?shadow|group|hosts|issue|sudoers|master\.passwd|security/|ssh/|mysql/|kubernetes/
              |apache2?/|nginx/|httpd/|crontab|fstab|motd|hostname|resolv\.conf|environment|profile)
      | proc/(?:self|\d+|version|cpuinfo|meminfo|net/|sched_debug|mounts)(?:/|\b)
      | var/log/ | var/(?:mail|spool)/ | var/run/secrets/ | var/lib/mysql/ | boot/grub/ | usr/local/tomcat/ | root/\.
      | /conf/(?:server|context|tomcat-users)\.xml\b | \b(?:httpd|nginx|php|apache2|lighttpd|php-fpm)\.(?:conf|ini)\b
      | (?:^|/)(?:windows|winnt)/(?:win\.ini|system\.ini|system32|repair|panther) | (?:^|/)system32/
      | \bwin\.ini\b | \bboot\.ini\b | (?:^|/)inetpub/ | /[a-z]\$/
      | \.ssh/ | \bid_(?:rsa|dsa|ecdsa|ed25519)\b | \bauthorized_keys\b | \.(?:bash|zsh|mysql|psql)_history\b
      | \.aws/(?:credentials|config) | \.kube/config | \.docker/config\.json | \btomcat-users\.xml\b
      | \bapplicationhost\.config\b | \bmy\.cnf\b | \bsshd_config\b | \bgrub\.cfg\b | \buser\.myd\b )""",
     targets=LFI_TARGETS, transforms=("path",))

rule(930130, "lfi", 1, "critical", "Restricted File Access Attempt", r"""
    (?:^|/)(?: \.git/ | \.git$ | \.svn/ | \.hg/ | \.env(?:$|[./]) | \.htaccess\b | \.htpasswd\b | web-inf(?:/|$)
             | meta-inf/ | web\.config\b | wp-config\.php | \.ds_store\b | \.npmrc\b | \.pypirc\b | \.netrc\b
             | (?:config/)?database\.yml\b | parameters\.yml\b | application\.(?:properties|ya?ml)\b
             | prconfig\.xml\b | \.bash_profile\b | \.bashrc\b | server-(?:status|info)(?:$|/) )""", targets=LFI_TARGETS, transforms=("path",))

rule(933200, "lfi", 1, "critical", "Local File Inclusion: stream wrapper or file URL scheme detected", r"""
    \b(?:php|phar|zip|expect|glob|data|compress\.(?:zlib|bzip2)|zlib|bzip2|ogg|rar|ssh2(?:\.\w+)?|file|jar
        |netdoc|gopher|dict)://""", transforms=("lower",), targets=LFI_TARGETS)



# ---------------------------------------------------------------------------
# 932/933/934/944: remote command execution and code injection

# Commands that are not English words: after a shell separator, they are enough.
_UNIX_DISTINCT = r"""(?:whoami|uname|ifconfig|ipconfig|netstat|printenv|crontab|nslookup|mkfifo|socat|ncat|netcat|nohup
    |xterm|wget|chmod|chown|chgrp|useradd|usermod|passwd|telnet|tftp|sudo|busybox|base64|openssl|gcc|nmap|lsof
    |strace|getent|killall|pkill|dmesg|systeminfo|tasklist|taskkill|certutil|bitsadmin|regsvr32|rundll32
    |mshta|wmic|schtasks|nc|zsh|ksh|csh|tcsh|printf)"""
# Commands that are also words: they need an argument that looks like a shell's.
_UNIX_WORDS = r"""(?:cat|ls|id|rm|ping|sleep|echo|env|ps|find|head|tail|awk|sed|grep|kill|touch|cp|mv|python[23]?
    |perl|php|ruby|node|lua|java|tac|nl|od|xxd|strings|dd|tar|unzip|mount|df|du|ip|arp|route|dig|whois|ftp|scp
    |ssh|rsync|timeout|xargs|tee|chroot|su|exec|eval|curl|bash|sh|dash|hostname|w|who)"""
# At the very start of a value (no separator), only these, and only with an option or a path.
_UNIX_START = r"""(?:""" + _UNIX_DISTINCT + r"""|cat|ls|rm|ping|echo|env|ps|awk|sed|grep|python[23]?|perl|php|ruby
    |node|bash|sh|curl|nc)"""
_SEPARATOR = r"""(?:[;|&\n\r`]|\$\(|\|\||&&|<\(|>\()"""
_SHELL_ARGUMENT = r"""(?=\s+(?:-{1,2}[a-z]|/[\w./~-]|/\s|~/|\$|\w+://|\d{1,3}(?:\.\d{1,3}){3}|[<>|&;`]|\d+\s*(?:$|[;|&`)])
                          |[^\s;|&<>]+\s*>{1,2}\s*[/~$&])
                     |\s*(?:$|[;|&`)<>])|\s+(?:aux|-?ef)\b)"""
_PATH_PREFIX = r"(?:[\w./]*/)?"

rule(932100, "rce", 1, "critical", "Remote Command Execution: Unix Command Injection", r"""
      """ + _SEPARATOR + r"""\s*(?:\{\s*)?""" + _PATH_PREFIX + _UNIX_DISTINCT + r"""\b(?!-)(?![.]\w)
    | """ + _SEPARATOR + r"""\s*(?:\{\s*)?""" + _PATH_PREFIX + _UNIX_WORDS + r"""\b""" + _SHELL_ARGUMENT + r"""
    | ^\s*""" + _PATH_PREFIX + _UNIX_START + r"""\s+(?:-{1,2}[a-z]\w*(?:\s|$)|/[\w.~-]+/)
    """, transforms=("cmd",))

rule(932110, "rce", 1, "critical", "Remote Command Execution: Windows Command Injection", r"""
      """ + _SEPARATOR + r"""\s*(?:dir|type|copy|del|move|ren|rd|md|attrib|icacls|more)\s+(?:[a-z]:|\\\\|%\w+%|/[a-z]\b|\.\.?\\)
    | """ + _SEPARATOR + r"""\s*net1?\s+(?:user|localgroup|group|share|view|use|session|start|stop|accounts|config)\b
    | \bcmd(?:\.exe)?\s+/[ckr]\b | \bwhoami\s+/(?:priv|groups|all|user)\b | \bcertutil(?:\.exe)?\s+-
    | \bfor\s+/[fldr]\b.{0,200}?\bdo\b | \b(?:rundll32|regsvr32|mshta|bitsadmin|wmic)(?:\.exe)?\s+\S
    | \b(?:ipconfig|systeminfo|tasklist)(?:\.exe)?(?:\s+/\w+)?\s*(?:$|[;|&])""", transforms=("compact",))

rule(932120, "rce", 1, "critical", "Remote Command Execution: Windows PowerShell Command Found", r"""
      \b(?:powershell|pwsh)(?:\.exe)?\s+(?:-|['"/])
    | \binvoke-(?:expression|webrequest|command|restmethod|item|shellcode|mimikatz|wmimethod)\b | \biex\s*\(
    | \bnew-object\s+(?:-typename\s+)?(?:system\.)?net\.webclient | \.download(?:string|file|data)\s*\(
    | \b(?:start-process|get-childitem|set-executionpolicy|get-wmiobject|add-mppreference)\b
    | -executionpolicy\s+bypass | -encodedcommand\b | \s-e(?:nc?)?\s+[a-z0-9+/=]{12,}""", transforms=("compact",))

rule(932130, "rce", 1, "critical", "Remote Command Execution: Unix Shell Expression Found", r"""
      \$\{?ifs\b | /dev/(?:tcp|udp)/\S | \{\s*[a-z]+\s*,[^{}\s]*/[^{}\s]*\} | <<<\s*\S
    | \|\s*(?:ba|z|k|c|da)?sh\b\s*(?:$|[;|&)-]) | \b(?:ba|z|k)?sh\s+-[ci]\b
    | (?:^|""" + _SEPARATOR + r""")\s*(?:/[\w.?*]{1,64}){0,8}/(?:[\w.]{0,64}[?*]+[\w.]{1,64}[\w.?*]{0,64}|[\w.]{0,64}[?*]{2,})(?:\s|$)""",
     transforms=("compact", "cmd"))

rule(932160, "rce", 1, "critical", "Remote Command Execution: Unix Shell Code Found", r"""
    (?:^|[^\w.-])/?(?:usr/(?:local/)?)?s?bin/(?:ba|z|k|c|tc|da)?sh\b
    | (?:^|[;|&`(\s])/(?:usr/(?:local/)?)?s?bin/[a-z0-9_.-]+""", transforms=("path",))

rule(932170, "rce", 1, "critical", "Remote Command Execution: Shellshock (CVE-2014-6271)", r"""
    ^\s*\(\s*\)\s*\{""", targets=ALL, transforms=("raw", "decoded"))

rule(933100, "rce", 1, "critical", "PHP Injection Attack: PHP Open Tag Found", r"""
    <\?(?:php\b|=|\s) | \[/?php\]""", targets=ALL, transforms=("lower",))

rule(933130, "rce", 1, "critical", "PHP Injection Attack: Variables Found", r"""
    \$_(?:get|post|request|cookie|server|files|env|session)\b | \$globals\b | \bphp://(?:input|stdin)\b""",
     transforms=("lower",))

rule(933160, "rce", 1, "critical", "PHP Injection Attack: High-Risk PHP Function Call Found", r"""
    \b(?:system|exec|passthru|shell_exec|popen|proc_open|pcntl_exec|eval|assert|phpinfo|base64_decode|gzinflate
        |str_rot13|create_function|call_user_func(?:_array)?|preg_replace|file_get_contents|file_put_contents|fopen
        |readfile|include(?:_once)?|require(?:_once)?|unserialize|highlight_file|show_source|fsockopen|mail)
    \s*\(\s*(?:['"`$]|\))""", transforms=("compact",))

rule(933170, "rce", 1, "critical", "PHP Injection Attack: Serialized Object Injection", r"""
    \b[oc]:\d+:"[\w\\]+":\d+:\{""", transforms=("lower",))

rule(934100, "rce", 1, "critical", "Node.js Injection Attack", r"""
    \bchild_process\b | \bprocess\s*\.\s*(?:mainmodule|binding|dlopen)\b | _\$\$nd_func\$\$_
    | \brequire\s*\(\s*['"`](?:child_process|fs|net|vm|os|worker_threads)['"`]\s*\)
    | \.constructor\s*\(\s*['"`]return\s+process""", targets=ALL, transforms=("compact",))

rule(934130, "rce", 1, "critical", "JavaScript Prototype Pollution", r"""
    \b__proto__\b | \bconstructor\s*(?:\.|\[\s*['"]?)\s*prototype\b""", targets=ARGS, transforms=("compact",))

rule(934900, "rce", 1, "critical", "Server-Side Template Injection", r"""
      \{\{[^{}]{0,300}?(?:__\w+__|\bconfig\b|\brequest\s*\.|\bself\s*\.|\blipsum\b|\bcycler\b|\bjoiner\b|\bnamespace\b|\|\s*attr\b)[^{}]{0,300}\}\}
    | \{%[^%{]{0,300}?(?:import|include|set|for)\b[^%{]{0,300}%\}
    | <%=?[^%<]{0,300}?(?:`|\b(?:system|exec|runtime|process|eval|open|require)\b|\d+\s*[*+/-]\s*\d+)[^%<]{0,300}%>
    | [#$]\{\s*\d+\s*[*+/-]\s*\d+\s*\} | \$\{\{[^{}]{0,300}\}\}""", transforms=("compact",))

rule(934910, "rce", 1, "critical", "Python Code Injection", r"""
      \b__import__\s*\( | \.__(?:class|mro|subclasses|globals|builtins|bases?|getattribute|init|code|reduce)__\b
    | \bos\s*\.\s*(?:system|popen|exec\w*|spawn\w*)\s*\( | \bsubprocess\s*\.\s*(?:popen|call|run|check_output)\s*\(
    | \b(?:eval|exec)\s*\(\s*compile\s*\( | \bpickle\.loads\s*\(""", transforms=("compact",))

rule(944100, "rce", 1, "critical", "Remote Command Execution: Suspicious Java class detected", r"""
      \bjava\s*\.\s*lang\s*\.\s*(?:runtime|processbuilder|system|class|thread|reflect)\b
    | \bruntime\s*\.\s*getruntime\s*\( | \bnew\s+(?:java\.lang\.)?processbuilder\s*\(
    | \bt\s*\(\s*java\.\w | \.forname\s*\(\s*['"]? | \bjavax\.script\.""", targets=ALL, transforms=("compact",))

rule(944110, "rce", 1, "critical", "Remote Command Execution: Java class loader manipulation", r"""
    \bclass\s*\.\s*(?:module\s*\.\s*)?classloader\b | \.classloader\s*\.\s*(?:resources|urls)\b""",
     targets=ALL, transforms=("compact",))

rule(944130, "rce", 1, "critical", "Remote Command Execution: OGNL / EL / Velocity expression injection", r"""
    @ognl\. | \#_?memberaccess\b | \#context\s*\[ | %\{\s*\(\s*\# | \#set\s*\(\s*\$\w+\s*=
    | \#application\s*\[ | \#request\s*\[ | \bognlcontext\b""", targets=ALL, transforms=("compact",))


_LOG4J_LOOKUP = re.compile(r"\$\{(?:(?:lower|upper)\s*:\s*([^${}])|(?:[^${}:]*:)*-([^${}]*))\}")


def _log4shell(value: Value) -> str | None:
    text = value.get("lower")
    if "${" not in text:
        return None
    # Resolve the lookups used to hide "jndi": ${lower:j}, ${::-j}, ${env:X:-j}.
    for _ in range(8):
        resolved = _LOG4J_LOOKUP.sub(lambda m: m.group(1) or m.group(2) or "", text)
        if resolved == text:
            break
        text = resolved
    found = re.search(r"\$\{\s*jndi\s*:\s*(?:ldaps?|rmi|dns|iiop|corba|nds|nis|http|https)?", text)
    return found.group() if found else None


rule(944150, "rce", 1, "critical", "Potential Remote Command Execution: Log4j / Log4Shell (CVE-2021-44228)",
     targets=ALL, check=_log4shell)


# ---------------------------------------------------------------------------
# 920/921: protocol enforcement and protocol attacks

# Value rules: CR/LF followed by a header, a request line or a body.
_INJECTED_HEADERS = r"""(?:set-cookie2?|cookie|location|refresh|content-(?:type|length|disposition|security-policy|encoding)
    |transfer-encoding|host|via|x-forwarded-(?:for|host|proto|server)|forwarded|x-real-ip|x-original-url|x-rewrite-url
    |remote-(?:addr|ip|host)|x-originating-ip|x-client-ip|access-control-allow-\w+|authorization|x-xss-protection
    |strict-transport-security|link|connection|upgrade|expect)"""
_CRLF_HEADER = r"\n\ ?" + _INJECTED_HEADERS + r"\ ?:|\n\n\ ?(?:<|http/\d)"
_CRLF_LINE = r"""\n\ ?(?:(?:get|post|head|put|delete|options|patch|connect|trace|propfind)\ \S{1,4096}\ http/\d
                |http/\d(?:\.\d)?\ \d{3}\b)"""


_VALUES = frozenset({"path", "arg", "name", "cookie"})

rule(921130, "protocol", 1, "critical", "HTTP Response Splitting / Header Injection Attack (CR/LF and header)",
     _CRLF_HEADER, targets=_VALUES, transforms=("crlf",))
rule(921120, "protocol", 1, "critical", "HTTP Request Smuggling / Response Splitting Attack (CR/LF and request line)",
     _CRLF_LINE, targets=_VALUES, transforms=("crlf",))

rule(920270, "protocol", 1, "critical", "Invalid character in request (null character)", r"\x00",
     targets=ALL, transforms=("raw", "decoded"))
# CRS has this at paranoia 2; chat text never contains C0 controls (other than
# tab and line breaks), and terminal escapes aimed at agents' consoles are a
# chat risk: chatproxy has it at paranoia 1. (Form feed and vertical tab,
# which pasted word-processor text may carry, are left out.)
rule(920271, "protocol", 1, "critical", "Invalid character in request (non printable characters)",
     r"[\x01-\x08\x0e-\x1f\x7f]", targets=ALL, transforms=("raw", "decoded"))
rule(920272, "protocol", 3, "critical", "Invalid character in request (outside of printable chars below ascii 127)",
     r"[^\x09\x20-\x7e]", targets=frozenset({"path", "header", "ua"}), transforms=("raw", "decoded"))
rule(920260, "protocol", 1, "warning", "Unicode Full/Half Width Abuse Attack Attempt", r"%u[fF]{2}[0-9a-fA-F]{2}",
     targets=_VALUES, transforms=("raw",))
rule(920230, "protocol", 2, "warning", "Multiple URL Encoding Detected",
     r"%(?:[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})", targets=frozenset({"path", "arg", "name"}), transforms=("raw",))

# Request-level rules: checked by the filter on the request head (no pattern).
REQUEST_RULES = [
    rule(920100, "protocol", 1, "critical", "Invalid HTTP Request Line (method is not a token)", targets=frozenset()),
    rule(920160, "protocol", 1, "critical", "Content-Length HTTP header is not numeric", targets=frozenset()),
    rule(920161, "protocol", 1, "critical", "Multiple or conflicting Content-Length / Transfer-Encoding headers",
         targets=frozenset()),
    rule(920170, "protocol", 1, "critical", "GET or HEAD Request with Body Content", targets=frozenset()),
    rule(920220, "protocol", 1, "warning", "URL Encoding Abuse Attack Attempt (invalid percent-encoding)",
         targets=frozenset()),
    rule(920311, "protocol", 1, "notice", "Request Has an Empty Accept Header", targets=frozenset()),
    rule(920330, "protocol", 1, "notice", "Empty User Agent Header", targets=frozenset()),
    rule(920340, "protocol", 1, "notice", "Request Containing Content, but Missing Content-Type header",
         targets=frozenset()),
    rule(920350, "protocol", 1, "warning", "Host header is a numeric IP address", targets=frozenset()),
    rule(920440, "protocol", 1, "critical", "URL file extension is restricted by policy", targets=frozenset()),
    rule(920450, "protocol", 1, "critical", "HTTP header is restricted by policy", targets=frozenset()),
    rule(920470, "protocol", 1, "critical", "Illegal Content-Type header", targets=frozenset()),
    rule(920480, "protocol", 1, "critical", "Request content type charset is not allowed by policy",
         targets=frozenset()),
    rule(200002, "protocol", 1, "critical", "Failed to parse request body", targets=frozenset()),
    rule(920300, "protocol", 2, "notice", "Request Missing an Accept Header", targets=frozenset()),
    rule(920320, "protocol", 2, "notice", "Missing User Agent Header", targets=frozenset()),
    rule(920380, "protocol", 2, "critical", "Too many arguments in request", targets=frozenset()),
]

MAX_ARGS = 255
RESTRICTED_EXTENSIONS = frozenset("""
    asa asax ascx backup bak bat cdx cer cfg cmd com config conf cs csproj csr dat db dbf dll dos htr htw ida idc idq
    inc ini key licx lnk log mdb old pass pdb pol printer pwd rdb resources resx sql swp sys vb vbs vbproj vsdisco
    webinfo xsd xsx""".split())
RESTRICTED_HEADERS = frozenset({b"proxy", b"lock-token", b"content-range", b"if"})
ALLOWED_CHARSETS = frozenset({"utf-8", "iso-8859-1", "iso-8859-15", "windows-1252", "us-ascii"})
CONTENT_TYPE_RE = re.compile(
    r"""^[\w/.+*-]+(?:\s?;\s?(?:action|boundary|charset|component|start(?:-info)?|type|version)\s?=\s?['"\w.()+,/:=?<>@#*-]+)*$""",
    re.I)

RULES_BY_ID = {r.id: r for r in RULES}
# Rules that count characters rather than recognise an attack: they keep to
# the arguments at every paranoia level (a User-Agent has a dozen specials).
ARGUMENTS_ONLY = frozenset({942430, 942431, 942432, 942460})
