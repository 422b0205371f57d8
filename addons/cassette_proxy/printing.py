"""What reaches the terminal: flow lines printed with a cassette's redaction.

mitmdump's flow printer (the ``dumper`` addon, ``cassette-proxy run --full``) is handed
a copy of each flow with the same credentials redacted as in a cassette.
"""

from __future__ import annotations

from typing import Any

from .bodies import message_secrets
from .redact import REDACTED, is_secret_header, redact_text, redact_url, scrub


def printable_flow(flow: Any) -> Any:
    """A copy of an HTTP flow for printing: credentials in URL, headers, bodies redacted."""
    copy = flow.copy()
    request = copy.request
    secrets, _ = message_secrets(request)
    request.url = scrub(redact_url(flow.request.url), secrets)
    for message in (request, copy.response):
        if message is None:
            continue
        for name in list(message.headers.keys()):
            if is_secret_header(name):
                message.headers[name] = REDACTED
            else:
                message.headers[name] = scrub(redact_text(message.headers[name]), secrets)
        if message.raw_content:
            try:
                text = message.get_text(strict=False)
            except ValueError:
                continue
            if text is not None:
                message.text = scrub(redact_text(text), secrets)
    return copy


def guard_flow_lines(master: Any) -> None:
    """Make mitmdump's flow printer (if loaded) print ``printable_flow`` copies."""
    dumper = master.addons.get("dumper") if master is not None else None
    if dumper is None or getattr(dumper, "cassette_redacts", False):
        return
    original = dumper.echo_flow

    def echo_flow(flow: Any) -> None:
        try:
            shown = printable_flow(flow)
        except Exception:  # noqa: BLE001 - print nothing rather than a credential
            return
        original(shown)

    dumper.echo_flow = echo_flow
    dumper.cassette_redacts = True
