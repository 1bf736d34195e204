"""Credentials never leave the process: scrubbing of every param, tag, logged text, message and report.

Removes URI userinfo (`http://user:pass@host`), secret query parameters, `key: value` assignments whose
key names a secret, token-looking strings (AWS, Hugging Face, GitHub, JWT...) and the values of secret
environment variables present now (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN...).
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any, Mapping

REDACTED = "***"

_SECRET_KEY_PATTERNS = ("*secret*", "*token*", "*password*", "*passwd*", "*credential*", "*api_key*", "*apikey*",
                        "*access_key*", "*private_key*", "*session_key*", "aws_*", "*authorization*", "*auth_token*")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s:]*(?::[^/@\s]*)?)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<k>[?&;](?:[^=&\s]*(?:secret|token|password|passwd|signature|credential|access_key|api_key|apikey|sig))=)(?P<v>[^&\s#]+)"
)
# `hub_token: abc`, `"aws_secret_access_key": "abc"`, `password=abc` inside YAML, JSON or free text
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?P<k>[\"']?\b[\w.\-]*(?:secret|token|password|passwd|credential|access_key|api_key|apikey|private_key)[\w.\-]*[\"']?\s*[:=]\s*)"
    r"(?P<v>\"[^\"\n]*\"|'[^'\n]*'|[^\s,}&#]+)"
)
_TOKEN_LIKE = re.compile(
    r"\b(?:AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bhf_[A-Za-z0-9]{20,}\b"  # Hugging Face
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}\b|\bgithub_pat_[A-Za-z0-9_]{20,}\b"  # GitHub
    r"|\bsk-[A-Za-z0-9_\-]{20,}\b"  # OpenAI-style
    r"|\bxox[abposr]-[A-Za-z0-9\-]{10,}\b"  # Slack
    r"|\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\b"  # JWT
)


def is_secret_key(key: str) -> bool:
    """True for names such as AWS_SECRET_ACCESS_KEY, hub_token, db.password."""
    k = key.lower()
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


def scrub_text(text: str) -> str:
    """Remove credentials from free text: URI userinfo, secret query params, token-like strings,
    and the values of secret environment variables (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN...)."""
    if not text:
        return text
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m.group('k')}{REDACTED}", text)
    text = _SECRET_ASSIGNMENT.sub(_redact_assignment, text)
    return _TOKEN_LIKE.sub(REDACTED, text)


def scrub(key: str, value: Any) -> str:
    """The string to log for `key`: fully redacted when the key names a secret, else scrubbed text."""
    text = "" if value is None else str(value)
    last = key.rsplit(".", 1)[-1]
    if text and (is_secret_key(key) or is_secret_key(last)):
        return REDACTED
    return scrub_text(text)




def scrub_tree(d: Any, key: str = "") -> Any:
    """A nested dict/list with every string scrubbed (values under secret keys fully redacted)."""
    if isinstance(d, Mapping):
        return {k: scrub_tree(v, str(k)) for k, v in d.items()}
    if isinstance(d, list):
        return [scrub_tree(v, key) for v in d]
    if isinstance(d, str):
        return scrub(key, d)
    return d
