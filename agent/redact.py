"""What of a URL may be printed: scheme, host and port. Webhook URLs carry their secret in the path
(Slack's /services/T…/B…/<secret>), basic-auth URLs in the userinfo, some APIs in the query."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``https://user:pw@hooks.example.com:8443/services/T0/B0/SECRET?x=1`` -> ``https://hooks.example.com:8443/…``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<a URL>"
    hidden = "/…" if parts.path not in ("", "/") or parts.query or parts.fragment else parts.path
    return f"{parts.scheme}://{host}{port}{hidden}"


def redact(text: str) -> str:
    """``text`` with every URL in it redacted."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
