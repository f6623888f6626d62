"""Reads a PHP response's CGI headers to decide whether the job succeeded.

PHP-FPM always reports appStatus 0, so the truth is in STDOUT's header block: a `Status:` header
(or a raw `HTTP/1.x NNN` status line with `cgi.rfc2616_headers = 1`). No status or a 2xx one is
success; anything else is a failure.
"""

from __future__ import annotations

import re

_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? +(\d{3})")
_STATUS_HEADER = re.compile(rb"^status:[ \t]*(\d{3})", re.IGNORECASE)
_PHP_MESSAGE = re.compile(rb"PHP (?:Fatal error|Parse error|Warning|Error|Notice):\s+(.*)")

# The header block is searched only within this many bytes: PHP caps its own headers well below.
_HEADER_SCAN_LIMIT = 64 * 1024


def header_block(stdout: bytes) -> tuple[bytes, bytes]:
    """Splits STDOUT into (headers, body); a response without a blank line is all headers."""
    head = stdout[:_HEADER_SCAN_LIMIT]
    crlf = head.find(b"\r\n\r\n")
    lf = head.find(b"\n\n")
    if crlf != -1 and (lf == -1 or crlf < lf):
        return stdout[:crlf], stdout[crlf + 4 :]
    if lf != -1:
        return stdout[:lf], stdout[lf + 2 :]
    return head, b""


def response_status(stdout: bytes) -> int:
    """The HTTP status PHP set for this request; 200 when it set none."""
    if stdout.startswith(b"Content-type: text/html; charset=UTF-8\r\n\r\n"):
        return 200  # PHP's default header block, the common case: skip the scan.
    headers, _ = header_block(stdout)
    for index, line in enumerate(headers.splitlines()):
        if index == 0:
            match = _STATUS_LINE.match(line)
            if match:
                return int(match.group(1))
        match = _STATUS_HEADER.match(line)
        if match:
            return int(match.group(1))
    return 200


def error_message(stderr: bytes, stdout_body: bytes, status: int) -> str:
    """A one-line reason: PHP's own error text when it wrote one, else the status."""
    for line in stderr.splitlines():
        match = _PHP_MESSAGE.search(line)
        if match:
            return match.group(1).decode("utf-8", "replace").strip()
    text = stderr.strip().decode("utf-8", "replace")
    if text:
        first = text.splitlines()[0]
        return first.removeprefix("PHP message: ").strip()
    body = stdout_body.strip()[:200].decode("utf-8", "replace")
    if body:
        return f"HTTP {status}: {body}"
    return f"HTTP {status} from PHP-FPM with no error text"
