"""A throw-away PKI for TLS tests, made with the ``openssl`` CLI (what operators use too)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: a client certificate signed by a CA the server does not trust
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def self_signed_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    return cert, key


def issue(directory: Path, name: str, ca: tuple[Path, Path], san: str, usage: str) -> tuple[Path, Path]:
    """A leaf certificate for ``san`` (e.g. ``IP:127.0.0.1,DNS:localhost``), usage serverAuth/clientAuth."""
    cert, key, csr, ext = (directory / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        f"/CN={name}",
    )
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        ext,
    )
    return cert, key


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = self_signed_ca(directory, "ca")
    server = issue(directory, "server", ca, "IP:127.0.0.1,DNS:localhost", "serverAuth")
    client = issue(
        directory, "client", ca, "DNS:prometheus.example,URI:spiffe://example/prometheus", "clientAuth"
    )
    rogue_ca = self_signed_ca(directory, "rogue-ca")
    rogue = issue(directory, "rogue", rogue_ca, "DNS:prometheus.example", "clientAuth")
    return Pki(ca[0], ca[1], server[0], server[1], client[0], client[1], rogue[0], rogue[1])
