"""`fedvox certs`: SANs, permissions, no overwrite, chain verification, Flower-readable keys."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common import certs


def fedvox(argv: list[str]) -> int:
    """`fedvox certs ...` as simulations/cli.py dispatches it (add_arguments + run)."""
    assert argv[0] == "certs"
    parser = argparse.ArgumentParser(prog="fedvox certs")
    certs.add_arguments(parser)
    return certs.run(parser.parse_args(argv[1:]))


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_ca_and_server_cert_with_sans(tmp_path):
    out = tmp_path / "pki"
    assert (
        fedvox(
            ["certs", "init", "--out", str(out), "--host", "fl.example.org", "--host", "10.1.2.3"]
        )
        == 0
    )
    srv = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    srv.verify_directly_issued_by(ca)  # raises if the signature/issuer does not match
    for key in ("ca.key", "server.key"):
        assert _mode(out / key) == 0o600, key


def _handshake(pki, server_hostname: str) -> None:
    """One TLS handshake on 127.0.0.1, the client verifying like the SuperNode's httpx does."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)

        def serve() -> None:
            conn, _ = lsock.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with socket.create_connection(lsock.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    tls.sendall(b"x")
        finally:
            t.join(timeout=10)


def test_server_cert_passes_a_real_tls_handshake(tmp_path):
    pki = tmp_path / "pki"
    certs.init_ca(pki, ["fl.example.org"])
    for host in ("127.0.0.1", "localhost", "fl.example.org"):
        _handshake(pki, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, "evil.example.org")  # a name not in the SANs


def test_init_refuses_to_overwrite_and_keeps_existing_files(tmp_path, capsys):
    out = tmp_path / "pki"
    certs.init_ca(out, ["localhost"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert fedvox(["certs", "init", "--out", str(out), "--host", "localhost"]) == 2
    assert "ca.crt already exists" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Only one existing key is enough to refuse the whole set (nothing half-written).
    (out / "ca.crt").unlink()
    (out / "ca.key").unlink()
    with pytest.raises(certs.CertsError, match="server.pem"):
        certs.init_ca(out, ["localhost"])
    assert not (out / "ca.crt").exists()


def test_bad_host_is_a_clear_error(tmp_path):
    with pytest.raises(certs.CertsError, match="--host"):
        certs.init_ca(tmp_path, ["not a host!"])


def test_node_key_is_openssh_p384_readable_by_flower(tmp_path, capsys):
    out = tmp_path / "keys"
    assert fedvox(["certs", "node", "--out", str(out), "--name", "hospital-1"]) == 0
    priv, pub = out / "hospital-1", out / "hospital-1.pub"
    assert _mode(priv) == 0o600
    # The exact loaders Flower uses: flower-supernode --auth-supernode-private-key ...
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # ... and `flwr supernode register <pub>`.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert try_load_public_key(pub) == public_key_to_bytes(key.public_key())
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    # Second call: refused, the registered key survives.
    priv_before = priv.read_bytes()
    assert fedvox(["certs", "node", "--out", str(out), "--name", "hospital-1"]) == 2
    assert "hospital-1 already exists" in capsys.readouterr().out
    assert priv.read_bytes() == priv_before


def test_node_name_is_validated(tmp_path):
    with pytest.raises(certs.CertsError, match="--name"):
        certs.node_key(tmp_path, "../evil")
