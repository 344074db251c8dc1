"""Secrets out of what users see: passwords in URLs and in messages that quote them."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_SECRET_QUERY = re.compile(r"(?i)\b(password|passwd|pwd|token|secret)=[^&]*")


def redact_url(url: str) -> str:
    """Hide the password of a URL (``scheme://user:***@host``) so it can be shown."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    query = _SECRET_QUERY.sub(r"\1=***", parts.query)
    if parts.password is None and query == parts.query:
        return url  # nothing secret; urlunsplit would also mangle sqlite:////abs/path
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, url: str) -> str:
    """``text`` (say, a driver's error message) with the password of ``url`` hidden."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text
