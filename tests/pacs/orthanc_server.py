"""A real PACS for the pull tests: Orthanc with its DICOMweb plugin, on free loopback ports.

:func:`start_orthanc` writes a configuration into a temporary folder (its own
storage and index, HTTP basic authentication, one registered DICOM modality
allowed C-ECHO, C-FIND and C-GET), starts the ``Orthanc`` binary of the
Debian packages ``orthanc`` and ``orthanc-dicomweb``, and waits until it
answers. :meth:`Orthanc.stop` ends it. A system Orthanc service is never
touched: ports are chosen free, and nothing under /etc or /var is used.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

AET = "ORTHANC"
CALLING_AET = "FEDIMG"
USER = "fedimg"


def orthanc_binary() -> str | None:
    """The Orthanc executable (Debian installs it in /usr/sbin, which may not be on a user's PATH)."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin library, as listed by ``dpkg -L orthanc-dicomweb`` (or its usual paths)."""
    candidates: list[str] = []
    if shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False)
        candidates += [line for line in listed.stdout.splitlines() if "libOrthancDicomWeb.so" in line]
    candidates += glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*")
    candidates += glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")
    return next((c for c in candidates if os.path.isfile(c)), None)


def require_orthanc() -> tuple[str, str]:
    """The binary and plugin, or skip the test saying how to get them."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        missing = " and ".join(n for n, v in (("Orthanc", binary), ("its DICOMweb plugin", plugin)) if v is None)
        pytest.skip(
            f"{missing} not installed: expected the Debian packages orthanc and orthanc-dicomweb "
            "(.ci/run installs them: apt-get install orthanc orthanc-dicomweb)"
        )
    return binary, plugin


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc."""

    process: subprocess.Popen
    http_port: int
    dicom_port: int
    password: str = field(repr=False)
    workdir: Path
    config: dict

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"127.0.0.1:{self.dicom_port}"

    def session(self):  # -> requests.Session
        import requests

        s = requests.Session()
        s.auth = (USER, self.password)
        return s

    def upload(self, files: list[Path]) -> int:
        """POST each file to /instances (Orthanc's REST API); returns how many were stored."""
        n = 0
        with self.session() as s:
            for f in files:
                r = s.post(f"{self.url}/instances", data=f.read_bytes(), timeout=30)
                r.raise_for_status()
                n += 1
        return n

    def log_tail(self) -> str:
        try:
            return (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def orthanc_config(workdir: Path, plugin: str, http_port: int, dicom_port: int, password: str) -> dict:
    """The configuration the tests run Orthanc with."""
    return {
        "Name": "fedimg-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "Plugins": [plugin],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP from loopback only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "SaveJobs": False,
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "UnknownSopClassAccepted": False,
        # C-GET answers on our own association: the port is never dialled.
        "DicomModalities": {
            "fedimg": {
                "AET": CALLING_AET,
                "Host": "127.0.0.1",
                "Port": 104,
                "AllowEcho": True,
                "AllowFind": True,
                "AllowGet": True,
                "AllowMove": False,
                "AllowStore": False,
            }
        },
        "DicomModalitiesInDatabase": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }


def make_tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it.

    Returns:
        The CA certificate, the server certificate and the server key (PEM files).
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedimg test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    workdir.mkdir(parents=True, exist_ok=True)
    paths = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


class TlsProxy:
    """An https front for a running Orthanc: TLS on a free loopback port, plain HTTP to Orthanc behind it.

    Orthanc 1.10.1 of Debian 12 crashes (SIGSEGV in a civetweb worker) on the first HTTPS connection
    when its own ``SslEnabled`` is on, so TLS is terminated here, as a reverse proxy would in a hospital.
    An asyncio loop in a background thread relays the bytes.
    """

    def __init__(self, workdir: Path, target_port: int) -> None:
        import asyncio
        import ssl
        import threading

        self.ca_bundle, cert, key = make_tls_files(workdir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def start_orthanc(workdir: Path, attempts: int = 3, timeout_s: float = 30.0) -> Orthanc:
    """Start Orthanc in ``workdir`` and wait until its REST API and DICOMweb answer.

    A port taken between choosing and binding makes Orthanc exit: then new ports are tried.

    Args:
        workdir: its configuration, storage, index and log.
        attempts: port choices to try.
        timeout_s: how long to wait for each start.
    """
    binary, plugin = require_orthanc()
    import requests

    workdir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    last = ""
    for _ in range(attempts):
        http_port, dicom_port = _free_port(), _free_port()
        if http_port == dicom_port:
            continue
        config = orthanc_config(workdir, plugin, http_port, dicom_port, password)
        cfg_path = workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=1))
        log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(
            [binary, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir
        )
        log.close()
        server = Orthanc(proc, http_port, dicom_port, password, workdir, config)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with server.session() as s:
                    ok = (
                        s.get(f"{server.url}/system", timeout=2).ok
                        and s.get(f"{server.dicomweb}/studies?limit=1", timeout=2).ok
                    )
                with socket.create_connection(("127.0.0.1", dicom_port), timeout=2):
                    pass
                if ok:
                    return server
            except (requests.RequestException, OSError):
                pass
            time.sleep(0.2)
        server.stop()
        last = server.log_tail()
    raise RuntimeError(f"Orthanc did not start after {attempts} attempts; last log:\n{last}")
