"""TLS for every broker connection: the one `ssl.SSLContext`, and which TLS failures are for good.

Why here, once: the fast connection, the aiormq connections (publisher, `dlq`, `check`) must
trust the same CA and present the same client certificate; a process that builds contexts in
several places ends up verifying in some and not in others. The context is built at start, so a
missing or unreadable CA, certificate or key file stops the process before it connects.

Which failures are permanent: a broker certificate that does not verify (unknown CA, wrong
name, expired), a handshake the broker refuses (no client certificate, one it does not trust),
a port that does not speak TLS. Retrying cannot cure them, so at start they end the process with
one line naming the cause (`refusal`). With TLS 1.3 the broker checks the client certificate
after the client's handshake is done, so the client may see its alert, or only a reset if it
wrote first; `probe` listens without writing to read the alert (`broker.connect` uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl

from fastworker.amqp_url import AmqpUrl, UrlError

log = logging.getLogger("fastworker.broker")

PROBE_TIMEOUT = 2.0  # seconds `probe` listens after the handshake; the broker's alert takes ms

# Alerts a broker sends when it does not accept the client's certificate (or its absence).
_CLIENT_CERT_REQUIRED = {"TLSV13_ALERT_CERTIFICATE_REQUIRED"}
_CLIENT_CERT_REFUSED = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED",
    "TLSV1_ALERT_DECRYPT_ERROR",
}
_HANDSHAKE_FAILURE = {"SSLV3_ALERT_HANDSHAKE_FAILURE"}  # TLS 1.2's "no certificate", among others
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"}
# Lost connections, not refusals: retried like a reset.
_TRANSIENT = (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError, ssl.SSLWantReadError)
_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


class TlsSettingsError(UrlError):
    """A CA, certificate or key file cannot be used: a configuration error, found at start."""


class TlsRefused(ConnectionError):
    """The broker ended the TLS session before AMQP began; the TLS error `probe` read is its
    __cause__, so `refusal` can name it."""


def client_context(url: AmqpUrl) -> ssl.SSLContext | None:
    """The context for `url`'s connections (None for amqp://): the system's CAs unless the URL
    names its own, the client certificate if given. Raises TlsSettingsError naming the file."""
    if not url.tls:
        return None
    _readable(url.cacertfile, f"the CA file (cacertfile=, --amqp-ca) {url.cacertfile}")
    try:
        context = ssl.create_default_context(
            cafile=url.cacertfile, capath=url.capath, cadata=url.cadata
        )
    except (OSError, ssl.SSLError) as exc:
        raise TlsSettingsError(
            f"cannot load the CA certificates {url.cacertfile or url.capath or '(cadata=)'} "
            f"(cacertfile=, --amqp-ca): {_short(exc)}; it must hold PEM certificates"
        ) from None
    if url.certfile or url.keyfile:
        _client_certificate(context, url)
    if not url.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning(
            "TLS certificate verification is OFF (verify=verify_none) for %s: the connection is "
            "encrypted, but to whoever answers; anyone on the path can read and change jobs and "
            "the password. Give the broker's CA with cacertfile= instead.",
            url.where,
        )
    elif url.server_name == "":
        context.check_hostname = False  # no name to check; the chain still is
    return context


def _client_certificate(context: ssl.SSLContext, url: AmqpUrl) -> None:
    if not url.certfile:
        raise TlsSettingsError("keyfile= (--amqp-key) needs certfile= (--amqp-cert) too")
    cert_what = f"the client certificate (certfile=, --amqp-cert) {url.certfile}"
    key_what = "the client key (keyfile=, --amqp-key)"  # its path stays out of logs
    _readable(url.certfile, cert_what)
    _readable(url.keyfile, key_what)

    def no_password() -> bytes:
        raise TlsSettingsError(
            f"{key_what} is encrypted: give its password with password= in --amqp-url"
        )

    try:
        context.load_cert_chain(url.certfile, url.keyfile, password=url.key_password or no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSettingsError(f"{key_what} does not belong to {cert_what}") from None
        raise TlsSettingsError(
            f"cannot load {cert_what} with {key_what} ({_short(exc)}): both must be PEM files"
            + (", and the key's password= must be right" if url.key_password else "")
        ) from None


def _readable(path: str | None, what: str) -> None:
    """Names the file in the error (ssl's own errors do not)."""
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsSettingsError(f"cannot read {what}: {exc.strerror or exc}") from None


def _short(exc: BaseException) -> str:
    """An SSL error's text without its "[SSL: X]" prefix and "(_ssl.c:N)" suffix."""
    text = str(exc.args[1] if isinstance(exc, OSError) and len(exc.args) > 1 else exc)
    text = re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)
    return text or type(exc).__name__


def ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind `exc` (aiormq wraps it in its own), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # chains may loop
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def refusal(url: AmqpUrl, exc: BaseException) -> str | None:
    """If `exc` is a TLS failure retrying cannot cure, one line naming the cause and the fix;
    None otherwise (no TLS error, or a lost connection)."""
    error = ssl_error(exc)
    if error is None or isinstance(error, _TRANSIENT):
        return None
    where = f"RabbitMQ at {url.where}"
    if isinstance(error, ssl.SSLCertVerificationError):
        why = error.verify_message or _short(error)
        if error.verify_code in _NAME_MISMATCH:
            return (
                f"{where}: its TLS certificate is not valid for the name "
                f"{url.server_hostname!r} ({why}): connect by a name the certificate holds, or "
                f"name one with server_name_indication= (--amqp-url {url.masked})"
            )
        trusted = (
            f"the CA in {url.cacertfile} did not sign it" if url.cacertfile else
            "the system's CAs did not sign it"
        )  # fmt: skip
        return (
            f"{where}: its TLS certificate does not verify ({why}; {trusted}): give the CA "
            f"that signed it with cacertfile= in --amqp-url or --amqp-ca"
        )
    reason = error.reason or ""
    why = _short(error)
    if reason in _CLIENT_CERT_REQUIRED or (reason in _HANDSHAKE_FAILURE and not url.certfile):
        return (
            f"{where} refused the TLS handshake ({why}): it requires a client certificate; "
            "give one with certfile= and keyfile= in --amqp-url, or --amqp-cert and --amqp-key"
        )
    if reason in _CLIENT_CERT_REFUSED:
        return (
            f"{where} refused the client certificate {url.certfile} ({why}): it must be signed "
            "by a CA the broker trusts (its ssl_options.cacertfile) and be valid now"
        )
    if reason in _NOT_TLS:
        return (
            f"{where} does not speak TLS on port {url.port} ({why}): amqps:// needs the "
            "broker's TLS listener (usually 5671); amqp:// is the plain one"
        )
    return f"{where}: the TLS handshake failed ({why}) (--amqp-url {url.masked})"


async def probe(url: AmqpUrl, context: ssl.SSLContext) -> ssl.SSLError | None:
    """Completes a TLS handshake and listens without writing, for up to PROBE_TIMEOUT.

    A broker that refuses the client's certificate sends its alert and closes; having written
    nothing, the client reads the alert (had it written, the broker's close could have turned
    into a reset that loses it). Returns that TLS error, or None if the broker waits for AMQP
    (TLS is fine), cannot be reached, or only dropped the connection.
    """
    found = await _listen(url, context)
    return None if found is None or isinstance(found, _TRANSIENT) else found


async def _listen(url: AmqpUrl, context: ssl.SSLContext) -> ssl.SSLError | None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                url.host, url.port, ssl=context, server_hostname=url.server_hostname
            ),
            PROBE_TIMEOUT,
        )
    except (OSError, TimeoutError) as exc:
        return ssl_error(exc)
    try:
        await asyncio.wait_for(reader.read(1), PROBE_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return ssl_error(exc)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), PROBE_TIMEOUT)
    return None


__all__ = [
    "TlsRefused",
    "TlsSettingsError",
    "client_context",
    "probe",
    "refusal",
    "ssl_error",
]
