#!/usr/bin/env python3
"""Test credentials for a fedhash federation: a CA, a SuperLink TLS certificate, SuperNode keys.

    python scripts/sites/make_certs.py OUT_DIR [--host 127.0.0.1 --host localhost ...]
                                               [--node hospital-a --node hospital-b ...]

writes

    OUT_DIR/ca.crt, ca.key            a self-signed test CA (give ca.crt to every SuperNode and to `flwr`)
    OUT_DIR/server.pem, server.key    the SuperLink's certificate, signed by the CA, valid for every --host
                                      and always for 127.0.0.1 and localhost: the SuperLink's own SuperExec
                                      reaches it over loopback (also when it binds --host 0.0.0.0)
    OUT_DIR/keys/<node>, <node>.pub   one SuperNode authentication key pair per --node: ECDSA P-384 in
                                      OpenSSH format, what `flower-supernode --auth-supernode-private-key`
                                      and `flwr supernode register` read (like `ssh-keygen -t ecdsa -b 384`)

For tests and trials only: a production CA keeps its key offline and each site makes its own key pair,
sending only the `.pub` file to whoever registers SuperNodes. Private keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")  # always in the certificate
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_NODES = ("site-a", "site-b")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_tls(out: Path, hosts: list[str], days: int = 30) -> dict[str, Path]:
    """A CA and a server certificate for `hosts` (plus 127.0.0.1 and localhost); returns the paths by role."""
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhash test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
    }
    _write(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca_key"], _pem_key(ca_key), private=True)
    _write(paths["server_cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["server_key"], _pem_key(key), private=True)
    return paths


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """One SuperNode key pair, ECDSA P-384 in OpenSSH format: (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = out / "keys" / name, out / "keys" / f"{name}.pub"
    _write(priv_path, private, private=True)
    _write(pub_path, public + f" fedhash-{name}\n".encode())
    return priv_path, pub_path


def make_all(out: Path, hosts: list[str] | None = None, nodes: list[str] | None = None) -> dict:
    """TLS material and node keys; returns {'ca_cert': ..., ..., 'nodes': {name: (private, public)}}."""
    out = Path(out)
    paths: dict = make_tls(out, list(hosts or DEFAULT_HOSTS))
    paths["nodes"] = {n: make_node_key(out, n) for n in (nodes or DEFAULT_NODES)}
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write into (created)")
    p.add_argument("--host", action="append", help="a name or IP the SuperLink is reached at "
                   f"(repeat; default {' '.join(DEFAULT_HOSTS)})")
    p.add_argument("--node", action="append", help=f"a SuperNode key pair to make (repeat; default "
                   f"{' '.join(DEFAULT_NODES)})")
    args = p.parse_args(argv)
    paths = make_all(args.out, args.host, args.node)
    for role, path in paths.items():
        if role != "nodes":
            print(f"{role:12s} {path}")
    for name, (priv, pub) in paths["nodes"].items():
        print(f"node {name:7s} {priv}  {pub}")


if __name__ == "__main__":
    main()
