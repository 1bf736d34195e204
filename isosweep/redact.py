"""Credentials never leave the process: scrubbing of every param, tag, logged text, message and report.

Removes URI userinfo (`http://user:pass@host`, a raw '@' in the password included), secret query parameters
(`?token=`, `X-Amz-Signature=`), `key: value` assignments whose key names a secret, Azure account keys and SAS
tokens (`AccountKey=...;` of a connection string), HTTP `Authorization` values (`Bearer ...`, `Basic ...`; the
scheme is kept), token-looking strings (AWS, Hugging Face, GitHub, Databricks, JWT...)
and the values of secret environment variables present now (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN...).

Standard library only and at the bottom of the layers, so every layer can scrub what it writes (the
report, the CLI's error messages) and `isosweep --help` stays fast. It is the one door: every layer imports it
from here.
"""

from __future__ import annotations

import fnmatch
import os
import re
import traceback
from typing import Any, Mapping

REDACTED = "***"

_SECRET_KEY_PATTERNS = ("*secret*", "*token*", "*password*", "*passwd*", "*credential*", "*api_key*", "*apikey*",
                        "*access_key*", "*private_key*", "*session_key*", "aws_*", "*authorization*", "*auth_token*",
                        "*cookie*", "*account_key*", "*accountkey*", "*storage_key*", "*connection_string*",
                        "*shared_access_key", "*sharedaccesskey", "*shared_access_signature*",
                        "*sharedaccesssignature*")
# userinfo as urlsplit reads it: up to the last '@' of the authority (`http://u:p@ss@host`: the password is `p@ss`);
# a `user:pass@` whose password holds a raw '?' or '#' (which end the authority) goes too: it is a credential all the same
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*|[^/?#@\s:]*:[^/\s]*)@")
# a value already scrubbed (`***` then a separator): an assignment or query pattern must not swallow what follows it
_DONE = r"(?!\*\*\*(?:[;&,}#\"'\s]|$))"
_SECRET_QUERY = re.compile(
    r"(?i)(?P<k>[?&;](?:[^=&\s]*(?:secret|token|password|passwd|signature|credential|access[_\-]?key|api[_\-]?key|sig))=)"
    r"(?P<v>" + _DONE + r"[^&\s#]+)"
)
# `hub_token: abc`, `"aws_secret_access_key": "abc"`, `password=abc` inside YAML, JSON or free text
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?P<k>[\"']?\b[\w.\-]*(?:secret|token|password|passwd|credential|access_key|api_key|apikey|private_key|signature)"
    r"[\w.\-]*[\"']?\s*[:=]\s*)"
    r"(?P<v>\"[^\"\n]*\"|'[^'\n]*'|" + _DONE + r"[^\s,}&#]+)"
)
# Azure: `AccountKey=...;` of a connection string, `SharedAccessSignature=sv=...&sig=...`, `account_key: ...`,
# `AZURE_STORAGE_KEY=...`: the value ends at the connection string's ';' so its other parts stay readable
_AZURE_KEY = re.compile(
    r"(?i)(?P<k>[\"']?\b[\w.\-]*(?:account_?key|storage_?key|shared_?access_?(?:key(?!_?name)|signature)|sas_?token)"
    r"[\w.\-]*[\"']?\s*[:=]\s*)"
    r"(?P<v>\"[^\"\n]*\"|'[^'\n]*'|[^;\s,}\"']+)"
)
# HTTP authorization: token schemes carry one token68 value; the others (Digest, AWS SigV4) a parameter list
_TOKEN_SCHEMES = ("bearer", "basic", "token", "negotiate", "ntlm", "apikey")
_PARAM_SCHEMES = ("digest", "aws4-hmac-sha256")
_AUTH_KEYS = ("authorization", "proxy-authorization", "proxy_authorization")
_TOKEN68 = r"[A-Za-z0-9\-._~+/]+=*"
# `Authorization: Bearer abc`, `'authorization': 'Basic dXNl...'`, `-H "Proxy-Authorization: Digest ..."`
_AUTH_HEADER = re.compile(
    r"(?i)(?P<k>\b(?:proxy[-_])?authorization[\"']?[ \t]*[:=][ \t]*[\"']?)"
    r"(?:(?P<scheme>" + "|".join(_TOKEN_SCHEMES) + r")\s+(?P<token>" + _TOKEN68 + r")"
    r"|(?P<pscheme>" + "|".join(_PARAM_SCHEMES) + r")\s+(?P<params>[^\n\"']+)"
    r"|(?!(?:" + "|".join(_TOKEN_SCHEMES + _PARAM_SCHEMES) + r")\s)(?P<bare>" + _TOKEN68 + r"))"  # `Bearer ***` stays
)
# `Bearer abc.def` outside a header (an error message quoting a request); see _looks_like_credential
_BARE_SCHEME = re.compile(r"\b(?P<scheme>Bearer|Basic|bearer)\s+(?P<token>[A-Za-z0-9\-._~+/]{5,}[A-Za-z0-9\-_~+/]=*)")
_TOKEN_LIKE = re.compile(
    r"\b(?:AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bhf_[A-Za-z0-9]{20,}\b"  # Hugging Face
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}\b|\bgithub_pat_[A-Za-z0-9_]{20,}\b"  # GitHub
    r"|\bglpat-[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|\bdapi[0-9a-f]{32}\b"  # Databricks (an MLflow tracking server)
    r"|\bsk-[A-Za-z0-9_\-]{20,}\b"  # OpenAI-style
    r"|\bxox[abposr]-[A-Za-z0-9\-]{10,}\b"  # Slack
    r"|\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"  # JWT
    r"|\beyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*"  # JWT with a short or no signature
)


def is_secret_key(key: str) -> bool:
    """True for names such as AWS_SECRET_ACCESS_KEY, hub_token, db.password, X-Api-Key, Authorization,
    AZURE_STORAGE_KEY, AZURE_STORAGE_CONNECTION_STRING, accountKey."""
    k = key.lower().replace("-", "_")
    return any(fnmatch.fnmatch(k, p) for p in _SECRET_KEY_PATTERNS)


# AWS settings that name where, not who: never secret, and scrubbing them garbles every S3 URI ("region=***")
_NOT_SECRET_ENV = {"aws_default_region", "aws_region", "aws_endpoint_url", "aws_endpoint_url_s3", "aws_profile",
                   "aws_default_output", "aws_config_file", "aws_shared_credentials_file", "aws_ca_bundle"}


def _secret_env_values() -> list[str]:
    """Values of secret-looking environment variables present now (longest first)."""
    env: dict[str, str] = {}
    for _ in range(5):  # another thread (MLflow's telemetry) may change os.environ while we copy it
        try:
            env = dict(os.environ)
            break
        except (KeyError, RuntimeError):
            continue
    vals = {v for k, v in env.items() if is_secret_key(k) and k.lower() not in _NOT_SECRET_ENV and v and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)


def _redact_assignment(m: re.Match) -> str:
    v = m.group("v")
    q = v[0] if v[0] in "\"'" else ""  # keep quotes so JSON and YAML stay parseable
    return f"{m.group('k')}{q}{REDACTED}{q}"


def _redact_auth_header(m: re.Match) -> str:
    scheme = m.group("scheme") or m.group("pscheme")
    return f"{m.group('k')}{scheme + ' ' if scheme else ''}{REDACTED}"


def _looks_like_credential(token: str) -> bool:
    """A token68 value rather than a word of prose ("Bearer tokens", "Basic settings."): it holds a digit or
    a symbol of base64/JWT, or it is long and mixes cases after its first letter (base64 of `user:pass`)."""
    return (any(c.isdigit() or c in "-._~+/=" for c in token)
            or (len(token) >= 12 and any(c.isupper() for c in token[1:]) and any(c.islower() for c in token)))


def _redact_bare_scheme(m: re.Match) -> str:
    if not _looks_like_credential(m.group("token")):
        return m.group(0)
    return f"{m.group('scheme')} {REDACTED}"


def scrub_text(text: str) -> str:
    """Remove credentials from free text: URI userinfo, secret query params, secret assignments, Authorization
    values, token-like strings, and the values of secret environment variables (AWS_SECRET_ACCESS_KEY...)."""
    if not text:
        return text
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _AZURE_KEY.sub(_redact_assignment, text)  # before the query: `;SharedAccessSignature=` ends at ';'
    text = _SECRET_QUERY.sub(lambda m: f"{m.group('k')}{REDACTED}", text)
    text = _AUTH_HEADER.sub(_redact_auth_header, text)  # before assignments: `authorization: Bearer x` keeps its scheme
    text = _BARE_SCHEME.sub(_redact_bare_scheme, text)
    text = _SECRET_ASSIGNMENT.sub(_redact_assignment, text)
    return _TOKEN_LIKE.sub(REDACTED, text)


def _scrub_authorization(value: str) -> str:
    """An Authorization header's value: its scheme kept (`Bearer ***`), the credential removed."""
    scheme, _, rest = value.strip().partition(" ")
    known = scheme.lower() in _TOKEN_SCHEMES + _PARAM_SCHEMES
    return f"{scheme} {REDACTED}" if known and rest.strip() else REDACTED


def scrub(key: str, value: Any) -> str:
    """The string to log for `key`: fully redacted when the key names a secret (an Authorization header keeps
    its scheme), else scrubbed text."""
    text = "" if value is None else str(value)
    last = key.rsplit(".", 1)[-1]
    if text and last.lower() in _AUTH_KEYS:
        return _scrub_authorization(text)
    if text and (is_secret_key(key) or is_secret_key(last)):
        return REDACTED
    return scrub_text(text)


def scrub_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """HTTP headers safe to print or log: `Authorization: Bearer ***`, cookies and API-key headers `***`,
    every other value scrubbed text."""
    return {str(k): scrub(str(k), v) for k, v in headers.items()}


def scrub_tree(d: Any, key: str = "") -> Any:
    """A nested dict/list with every string scrubbed (values under secret keys fully redacted)."""
    if isinstance(d, Mapping):
        return {k: scrub_tree(v, str(k)) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [scrub_tree(v, key) for v in d]
    if isinstance(d, str):
        return scrub(key, d)
    return d


def format_exception_scrubbed(exc: BaseException, *, with_traceback: bool = True) -> str:
    """An exception and its chain (`raise ... from`, "During handling ..."), scrubbed, as text ending in a newline.

    with_traceback=True: what Python prints for an uncaught exception (causes first, notes included).
    with_traceback=False: one `Type: message` line per exception, outermost first, then `caused by: ...`.
    """
    if with_traceback:
        return scrub_text("".join(traceback.format_exception(exc)))
    lines, seen, current, link = [], set(), exc, ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        only = "".join(traceback.format_exception_only(current)).rstrip("\n")
        lines.append(f"{link}{only}")
        if current.__cause__ is not None:
            current, link = current.__cause__, "caused by: "
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "while handling: "
        else:
            current = None
    return scrub_text("\n".join(lines) + "\n")
