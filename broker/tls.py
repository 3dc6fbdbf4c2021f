"""TLS to Redis: the settings that carry it, and what a failed handshake means.

Every TLS option travels in the Redis URL's query as one of redis-py's ``ssl_*`` parameters,
so every client built anywhere (the roles, the SDK, the CLI, the gateway, readiness probes)
gets it the same way. The settings ``IB_REDIS_TLS_CA``, ``IB_REDIS_TLS_CERT`` and
``IB_REDIS_TLS_KEY`` (paths kept out of the command line) are written into that query by
:func:`tls_url`. Paths may be shown in messages; the contents of a key file never are.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from broker.errors import RedisMisconfigured

PARAMS = {"ssl_ca_certs": "IB_REDIS_TLS_CA", "ssl_certfile": "IB_REDIS_TLS_CERT", "ssl_keyfile": "IB_REDIS_TLS_KEY",
          "ssl_cert_reqs": "", "ssl_check_hostname": "", "ssl_ciphers": ""}
"""URL query parameters that redis-py 7.4 takes on both its node and its cluster client, and
the setting that writes each one, if any."""
NODE_ONLY = ("ssl_ca_path", "ssl_password")
"""Parameters that only the node client takes (its cluster client refuses them)."""
TLS_SCHEMES = ("rediss", "rediss+cluster")
WHAT = {"ssl_ca_certs": "CA file", "ssl_certfile": "client certificate", "ssl_keyfile": "client key"}


class TlsSettingsError(RedisMisconfigured, ValueError):
    """TLS settings that cannot work with the Redis URL. A ``ValueError``, as settings that do
    not validate are; a :class:`RedisMisconfigured` too, so that where the URL arrives later
    (the one ``up`` recorded) the CLI still says so in one line."""


def tls_url(url: str, *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> str:
    """``url`` with the CA, client certificate and key files as its ``ssl_*`` query parameters.

    A parameter the URL already has must agree. Raises :class:`TlsSettingsError` (one line) for
    files on a URL without TLS, a key without its certificate, or a disagreement.
    """
    # redis-py unquotes a query value twice (parse_qs, then unquote): a "%" must survive both.
    given = {name: str(path).replace("%", "%25") for name, path in zip(WHAT, (ca, cert, key), strict=True)
             if path is not None}
    if not given:
        return url
    parts = urlsplit(url)
    if parts.scheme not in TLS_SCHEMES:
        raise TlsSettingsError(f"{' and '.join(PARAMS[n] for n in given)} set for a Redis URL without TLS "
                               f"({parts.scheme}://); try: rediss:// (or rediss+cluster://)")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for name, path in given.items():
        if query.get(name, path) != path:
            raise TlsSettingsError(f"{PARAMS[name]} ({path}) and ?{name}={query[name]} in the Redis URL "
                                   "disagree; give one of them")
    query.update(given)
    if "ssl_keyfile" in query and "ssl_certfile" not in query:
        raise TlsSettingsError("a TLS client key needs its certificate: set IB_REDIS_TLS_CERT too (or ?ssl_certfile=)")
    return urlunsplit(parts._replace(query=urlencode(query, safe="/:~")))


def url_problem(url: str) -> str | None:
    """Why redis-py would refuse the ``ssl_*`` parameters of ``url`` (with a traceback), if it would."""
    parts = urlsplit(url)
    names = [name for name, _ in parse_qsl(parts.query) if name.startswith("ssl_")]
    if not names:
        return None
    if parts.scheme not in TLS_SCHEMES:
        return f"?{names[0]}= in the Redis URL needs TLS; try: rediss:// instead of {parts.scheme}://"
    cluster = parts.scheme.endswith("+cluster")
    known = [*PARAMS, *(() if cluster else NODE_ONLY)]
    for name in names:
        if name not in known:
            where = "the cluster client (rediss+cluster://)" if name in NODE_ONLY else "redis-py"
            return f"{where} does not take ?{name}= in the Redis URL; try one of: {', '.join(known)}"
    return None


class TlsFiles(NamedTuple):
    """The files a TLS client loads: a CA bundle, and its own certificate and key (for mutual TLS)."""

    ca: str | None
    cert: str | None
    key: str | None
    password: str | Callable[[], bytes] | None = None
    """The key's password (``ssl_password``), if it is encrypted."""

    def named(self) -> Iterator[tuple[str, str]]:
        """(URL parameter, path) of each file given."""
        return ((name, path) for name, path in zip(WHAT, self[:3], strict=True) if path)

    def problem(self) -> str | None:
        """Why these files cannot make a TLS context, naming the file (never its contents); else None."""
        for name, path in self.named():
            try:
                Path(path).read_bytes()
            except OSError as exc:
                return (f"cannot read the TLS {WHAT[name]} {path} ({exc.strerror or exc}); "
                        f"try: fix the path or its permissions ({_where(name)})")
        context = ssl.create_default_context()
        try:
            if self.ca:
                context.load_verify_locations(cafile=self.ca)
        except ssl.SSLError as exc:
            return (f"the TLS CA file {self.ca} holds no usable PEM certificate ({exc.reason or exc}); "
                    "try: the CA's PEM file")
        if not (self.cert or self.key):
            return None
        if not self.cert:
            return f"the TLS client key {self.key} needs its certificate; try: {_where('ssl_certfile')}"
        try:
            context.load_cert_chain(self.cert, self.key, password=self.password or no_password)
        except ssl.SSLError as exc:
            # OpenSSL gives no reason for a file that is not PEM, or a key it could not decrypt.
            encrypted = "a wrong ssl_password" if isinstance(self.password, str) else "an encrypted key"
            why = {"KEY_VALUES_MISMATCH": "the key is not the certificate's", None: f"not PEM, or {encrypted}"
                   }.get(exc.reason, exc.reason)
            return (f"the TLS client certificate {self.cert} and key {self.key or '(in the same file)'} do not load "
                    f"({why}); try: the certificate's PEM file and its own unencrypted PEM key")
        return None


def no_password() -> bytes:
    """A TLS key's password when none is given: with ``None`` instead, OpenSSL asks for an
    encrypted key's password on the terminal, and a role hangs there; this way the key fails to
    load, and the error says why."""
    return b""


def _where(name: str) -> str:
    """Where the file of URL parameter ``name`` is set."""
    return f"{PARAMS[name]}, or ?{name}= in the Redis URL"


REFUSED_CERT = {"UNKNOWN_CA": "not signed by a CA the server trusts", "CERTIFICATE_EXPIRED": "expired",
                "BAD_CERTIFICATE": "refused", "CERTIFICATE_REVOKED": "revoked", "CERTIFICATE_UNKNOWN": "refused",
                "UNSUPPORTED_CERTIFICATE": "of an unsupported kind", "DECRYPT_ERROR": "not proven by its key",
                "ACCESS_DENIED": "refused"}
"""TLS alerts by which a server refuses a client's certificate (the ends of OpenSSL's reasons), and why."""


def untrusted(error: ssl.SSLCertVerificationError, where: str, host: str, files: TlsFiles) -> str:
    """One line: the server's certificate failed this client's checks."""
    why = error.verify_message or error.reason or str(error)
    if error.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return (f"{where} presented a TLS certificate that is not valid for {host} ({why}); try: connect by a "
                "name the certificate lists")
    if error.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return f"{where} presented an expired TLS certificate; try: renew the server's certificate"
    trusting = f"trusting only {files.ca}" if files.ca else "trusting the system's CAs"
    return (f"{where} presented a TLS certificate this client does not trust ({why}; {trusting}); try: the CA "
            f"that signed it, in {_where('ssl_ca_certs')}")


def refused(error: ssl.SSLError, where: str, files: TlsFiles) -> str:
    """One line: the TLS handshake failed with ``error`` (an alert from the server, or a local refusal)."""
    reason = error.reason or str(error)
    if not files.cert and ("CERTIFICATE_REQUIRED" in reason or reason.endswith("HANDSHAKE_FAILURE")):
        return (f"{where} requires a client certificate (mutual TLS; {reason}) and this client gave none; try: "
                f"the client's certificate and key in IB_REDIS_TLS_CERT and IB_REDIS_TLS_KEY, or "
                f"?ssl_certfile=...&ssl_keyfile=... in the Redis URL")
    if files.cert and (why := next((w for end, w in REFUSED_CERT.items() if reason.endswith(end)), None)):
        fix = "a renewed one" if why == "expired" else "one signed by a CA the server trusts (its tls-ca-cert-file)"
        return f"{where} refused this client's TLS certificate {files.cert} ({why}: {reason}); try: {fix}"
    return f"the TLS handshake with {where} failed ({reason}); try: check the TLS settings of both sides"


async def refusal(host: str, port: int, context: ssl.SSLContext, timeout: float) -> ssl.SSLError | None:
    """The alert with which ``host:port`` refuses a client with ``context`` after the handshake, if it does.

    With TLS 1.3 a server checks the client's certificate after the client's side of the
    handshake is done, and its refusal is an alert the client reads next. When the client has
    already written a command, the server's close can reset the connection and the alert is
    lost: so this handshake writes nothing and only reads. A server content with the client
    sends nothing and the read times out: None.
    """
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            await reader.read(1)
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.transport.abort()
    return None
