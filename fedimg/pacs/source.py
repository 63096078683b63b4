"""Where studies are pulled from: a DICOMweb service or a DICOM (DIMSE) node, and how to reach it.

Secrets never travel on the command line (where ``ps`` and shell history
would show them): a DICOMweb password or token comes from an owner-only file
(``--credentials-file``) or from the environment variable
:data:`CREDENTIALS_ENV`, and is refused over plain HTTP to another machine.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fedimg.pacs.errors import PacsError

__all__ = [
    "AUTH_SCHEMES",
    "CREDENTIALS_ENV",
    "DicomWebSource",
    "DimseSource",
    "HttpAuth",
    "load_auth",
    "parse_host_port",
]

CREDENTIALS_ENV = "FEDIMG_PACS_CREDENTIALS"
AUTH_SCHEMES = ("basic", "bearer")
DEFAULT_TIMEOUT_S = 60.0
AE_TITLE_MAX_LEN = 16


def _is_loopback(host: str) -> bool:
    if host.casefold() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_timeout(timeout_s: float) -> None:
    if not (timeout_s > 0 and timeout_s < 86400):
        raise PacsError(f"--timeout must be a number of seconds between 0 and 86400, got {timeout_s!r}")


@dataclass(frozen=True)
class HttpAuth:
    """HTTP credentials for a DICOMweb service.

    Attributes:
        scheme: ``basic`` (``secret`` is ``user:password``) or ``bearer`` (``secret`` is the token).
        secret: the credential (never shown in ``repr``).
        origin: where it came from, for messages (a file path or the variable's name).
    """

    scheme: str
    secret: str = field(repr=False)
    origin: str = ""

    def header(self) -> dict[str, str]:
        """The ``Authorization`` header."""
        if self.scheme == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        return {"Authorization": "Basic " + base64.b64encode(self.secret.encode("utf-8")).decode("ascii")}


def load_auth(scheme: str, path: str | None = None, env: str = CREDENTIALS_ENV) -> HttpAuth:
    """Read a DICOMweb credential from an owner-only file, else from the environment.

    Args:
        scheme: ``basic`` (the credential is ``user:password``) or ``bearer`` (a token).
        path: the credentials file; None to read the variable ``env`` instead.
        env: the environment variable holding the credential itself.

    Raises:
        PacsError: unknown scheme; no file and no variable; the file is missing, not a regular file,
            readable by group or others, or empty; a basic credential without ``user:password``.
    """
    if scheme not in AUTH_SCHEMES:
        raise PacsError(f"--auth must be one of {', '.join(AUTH_SCHEMES)}, got {scheme!r}")
    fmt = "user:password on one line" if scheme == "basic" else "the token on one line"
    if path:
        p = Path(path)
        origin = f"credentials file {p}"
        try:
            st = os.stat(p)
        except OSError:
            raise PacsError(
                f"{origin} does not exist or cannot be examined: expected an owner-only file holding {fmt}"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise PacsError(f"{origin} is not a regular file: expected an owner-only file holding {fmt}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise PacsError(
                f"{origin} has mode {mode:04o}, readable or writable by group or others: expected "
                f"owner-only permissions; fix with: chmod 600 {p}"
            )
        try:
            secret = p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise PacsError(
                f"{origin} cannot be read ({type(exc).__name__}): expected a UTF-8 file holding {fmt}"
            ) from None
    else:
        origin = f"environment variable {env}"
        secret = os.environ.get(env, "").strip()
        if not secret:
            raise PacsError(
                f"--auth {scheme} needs a credential: expected --credentials-file FILE (owner-only, "
                f"holding {fmt}) or the environment variable {env}, found neither"
            )
    if not secret:
        raise PacsError(f"{origin} is empty: expected {fmt}")
    if "\n" in secret or "\r" in secret:
        raise PacsError(f"{origin} holds several lines: expected {fmt}")
    if scheme == "basic" and ":" not in secret:
        raise PacsError(f"{origin} holds no ':': expected {fmt}")
    return HttpAuth(scheme=scheme, secret=secret, origin=origin)


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOMweb service (QIDO-RS to search, WADO-RS to retrieve).

    Attributes:
        url: the service root, e.g. ``https://pacs.example.org/dicom-web`` (no credentials in it).
        auth: HTTP credentials, or None.
        ca_bundle: a CA certificate bundle to verify the server's TLS certificate (default: the system's).
        timeout_s: seconds to wait for a connection and for each read.
    """

    url: str
    auth: HttpAuth | None = None
    ca_bundle: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(
                f"--from dicomweb expects the service's http(s) URL, e.g. https://pacs.example.org/"
                f"dicom-web; got {self.url!r}"
            )
        if parts.username or parts.password:
            raise PacsError(
                "--from dicomweb: the URL holds credentials (user:password@): expected them in "
                f"--credentials-file FILE or ${CREDENTIALS_ENV}, never on the command line"
            )
        if parts.query or parts.fragment:
            raise PacsError(
                "--from dicomweb: expected the service root URL without '?' or '#' parts; got "
                f"{self.describe()!r} with them"
            )
        if self.auth is not None and parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise PacsError(
                f"--auth over plain http to {parts.hostname} would send the credential unencrypted: "
                "expected an https URL (or a loopback address)"
            )
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise PacsError(f"--ca-bundle {self.ca_bundle} is not a file: expected a PEM file of CA certificates")
        if self.ca_bundle is not None and parts.scheme != "https":
            raise PacsError("--ca-bundle applies to https URLs only; the --from dicomweb URL is plain http")
        _check_timeout(self.timeout_s)

    def describe(self) -> str:
        """The URL for messages (scheme, host, port and path only)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _check_ae_title(value: str, option: str) -> None:
    if not value.strip() or len(value) > AE_TITLE_MAX_LEN or any(not (" " <= ch <= "~") or ch == "\\" for ch in value):
        raise PacsError(
            f"{option} expects an AE title of 1 to {AE_TITLE_MAX_LEN} printable ASCII characters "
            f"without '\\', got {value!r}"
        )


@dataclass(frozen=True)
class DimseSource:
    """A DICOM node answering C-FIND and C-GET (Study Root).

    Attributes:
        host: host name or IP address.
        port: TCP port.
        called_aet: the PACS's AE title.
        calling_aet: ours, as registered at the PACS.
        timeout_s: seconds to wait for the association, each DIMSE message and the network.
    """

    host: str
    port: int
    called_aet: str
    calling_aet: str = "FEDIMG"
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.host or not (0 < self.port < 65536):
            raise PacsError(f"--from dimse expects HOST:PORT with a port from 1 to 65535, got {self.describe()!r}")
        _check_ae_title(self.called_aet, "--called-aet")
        _check_ae_title(self.calling_aet, "--calling-aet")
        _check_timeout(self.timeout_s)

    def describe(self) -> str:
        """``HOST:PORT`` and the AE titles, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} (called AET {self.called_aet}, calling AET {self.calling_aet})"


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as a pair.

    Raises:
        PacsError: no port, or a port that is not a number.
    """
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise PacsError(f"--from dimse expects HOST:PORT (e.g. pacs.example.org:104), got {text!r}")
    return host, int(port)
