"""Certificates and keys for a fedvox deployment (`fedvox certs ...`).

Two kinds of key material, both made with the `cryptography` library:

- `certs init`: a private CA plus a TLS server certificate for the SuperLink (or the reverse
  proxy in front of it). Hospitals get only `ca.crt`; it is how a SuperNode knows it talks to
  the real server.
- `certs node`: one key pair per hospital for Flower's SuperNode authentication. Flower 1.42
  reads the private key with `load_ssh_private_key` (flwr/supernode/cli/flower_supernode.py,
  `_try_setup_client_authentication`) and the public key with `load_ssh_public_key`
  (flwr/cli/supernode/register.py, `try_load_public_key`, NIST curves only), i.e. the same
  OpenSSH files `ssh-keygen -t ecdsa -b 384` writes. The private key stays at the hospital;
  the `.pub` file goes to the operator for `flwr supernode register`.

Private keys are written 0600 and never overwritten: losing a CA key or a registered node key
silently would break a running federation, so an existing file is a clear error instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
# Loopback names are always in the server certificate: the SuperLink behind the proxy and
# the operator's `flwr` CLI talk to it on 127.0.0.1.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertsError(Exception):
    """Bad input or a file that would be overwritten; the message names the file/setting."""


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode`; refuse if it exists (O_EXCL, so no race either)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertsError(f"{path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # umask may have stripped bits we asked for


def _check_free(paths: list[Path]) -> None:
    # Check all outputs before writing any, so a refused call leaves nothing half-made.
    for p in paths:
        if p.exists():
            raise CertsError(f"{p} already exists; refusing to overwrite it")


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, *LOOPBACK_HOSTS]):  # keep order, drop duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", h):
                raise CertsError(f"--host {h!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a TLS server signs and agrees keys."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_cert(
    key: ec.EllipticCurvePrivateKey, name: x509.Name, now: dt.datetime, days: int
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    hosts: list[str],
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        # 825 days: the longest lifetime common TLS clients still accept for a server cert.
        .not_valid_after(now + dt.timedelta(days=min(days, 825)))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(out: Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """Write a CA (ca.crt, ca.key) and a server cert (server.pem, server.key) signed by it.

    `hosts` are the names/IPs hospitals use to reach the server; localhost and 127.0.0.1 are
    always added. ECDSA P-384, SHA-384. Returns the written paths.
    """
    if not hosts:
        raise CertsError("--host: give at least one server name or IP address")
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / k for k in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    _check_free(list(paths.values()))
    _san(hosts)  # validate before generating anything
    now = dt.datetime.now(dt.UTC)
    ca_key, srv_key = (
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP384R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedvox federation CA")])
    ca_cert = _ca_cert(ca_key, ca_name, now, days)
    srv_cert = _server_cert(srv_key, ca_key, ca_name, hosts, now, days)
    pem = serialization.Encoding.PEM
    _write_new(paths[CA_KEY], _key_pem(ca_key), 0o600)
    _write_new(paths[SERVER_KEY], _key_pem(srv_key), 0o600)
    _write_new(paths[CA_CERT], ca_cert.public_bytes(pem), 0o644)
    _write_new(paths[SERVER_CERT], srv_cert.public_bytes(pem), 0o644)
    return paths


def node_key(out: Path, name: str) -> dict[str, Path]:
    """Write `<name>` (OpenSSH ECDSA P-384 private key, 0600) and `<name>.pub` into `out`."""
    if not _NAME_RE.match(name):
        raise CertsError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (max 64, no leading symbol)"
        )
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / name, out / f"{name}.pub"
    _check_free([priv_path, pub_path])
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # the SuperNode loads it unattended (password=None)
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_new(priv_path, priv, 0o600)
    _write_new(pub_path, pub + f" fedvox-{name}\n".encode(), 0o644)
    return {"private": priv_path, "public": pub_path}


# --- `fedvox certs` -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_command", required=True)
    p = sub.add_parser("init", help="create a CA and the SuperLink/proxy server certificate")
    p.add_argument("--out", type=Path, required=True, help="output folder (keys are 0600)")
    p.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="server DNS name or IP the hospitals connect to (repeatable); "
        "localhost and 127.0.0.1 are always included",
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p = sub.add_parser("node", help="create a hospital SuperNode key pair (OpenSSH, P-384)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--name", required=True, help="hospital name; files <name> and <name>.pub")


def run(args: argparse.Namespace) -> int:
    try:
        if args.certs_command == "init":
            paths = init_ca(args.out, args.host, days=args.days)
            print(f"CA:     {paths[CA_CERT]} (give this to every hospital)")
            print(f"        {paths[CA_KEY]} (keep offline; signs server certificates)")
            print(f"server: {paths[SERVER_CERT]}, {paths[SERVER_KEY]}")
        else:
            paths = node_key(args.out, args.name)
            print(f"private key: {paths['private']} (stays at the hospital)")
            print(f"public key:  {paths['public']} (send to the operator: flwr supernode register)")
    except CertsError as err:
        print(f"fedvox certs: error: {err}")
        return 2
    return 0
