"""Test PKI for NATS TLS: a CA, a server certificate for 127.0.0.1 and a client certificate, made with
`cryptography` into a directory. Short-lived EC keys, nothing reused between test sessions."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing of the server's: verification against it must fail


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, server: bool
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.DNSName("localhost")]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("weft test CA")
    server, server_key = _leaf("127.0.0.1", ca, ca_key, server=True)
    client, client_key = _leaf("weft-client", ca, ca_key, server=False)
    other, _ = _ca("some other CA")
    out = Certs(
        ca=directory / "ca.pem", server_cert=directory / "server.pem", server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem", client_key=directory / "client-key.pem",
        other_ca=directory / "other-ca.pem",
    )
    pem = serialization.Encoding.PEM
    out.ca.write_bytes(ca.public_bytes(pem))
    out.other_ca.write_bytes(other.public_bytes(pem))
    out.server_cert.write_bytes(server.public_bytes(pem))
    out.client_cert.write_bytes(client.public_bytes(pem))
    _write_key(server_key, out.server_key)
    _write_key(client_key, out.client_key)
    return out


# --- an operator/JWT setup and a .creds file (nats-server's decentralised auth) --------------------


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(signer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    import base64
    import hashlib
    import json
    import time

    claims: dict[str, Any] = {"iat": int(time.time()), "iss": signer.public_key.decode(), "name": name,
                              "sub": subject, "nats": {**nats, "version": 2}}
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
                                     ).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def _keys(prefix: int) -> Any:
    import os

    import nkeys

    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


@dataclass(frozen=True)
class Operator:
    server_conf: str  # operator, system account, MEMORY resolver with the accounts preloaded
    creds: Path  # a user of the account, as a .creds file (JWT + seed)


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
             "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def make_operator(directory: Path) -> Operator:
    """An operator, a system account, an application account with JetStream and one user of it,
    signed with nkeys: what `nsc` would make, written as nats-server config and a .creds file."""
    import nkeys

    directory.mkdir(parents=True, exist_ok=True)
    op = _keys(nkeys.PREFIX_BYTE_OPERATOR)
    sys_acc, acc, user = (_keys(nkeys.PREFIX_BYTE_ACCOUNT), _keys(nkeys.PREFIX_BYTE_ACCOUNT),
                          _keys(nkeys.PREFIX_BYTE_USER))
    op_pub = op.public_key.decode()
    op_jwt = _jwt(op, op_pub, "weft-test-operator", {"type": "operator"})
    sys_pub, acc_pub = sys_acc.public_key.decode(), acc.public_key.decode()
    sys_jwt = _jwt(op, sys_pub, "SYS", {"type": "account", "limits": {k: v for k, v in UNLIMITED.items()
                                                                       if k not in ("mem_storage", "disk_storage",
                                                                                    "streams", "consumer")}})
    acc_jwt = _jwt(op, acc_pub, "WEFT", {"type": "account", "limits": UNLIMITED})
    user_jwt = _jwt(acc, user.public_key.decode(), "weft",
                    {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    creds = directory / "weft.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n" + user_jwt + "\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n" + user.seed.decode() + "\n------END USER NKEY SEED------\n"
    )
    creds.chmod(0o600)
    conf = (f'operator: "{op_jwt}"\nsystem_account: "{sys_pub}"\nresolver: MEMORY\n'
            f'resolver_preload: {{\n  {sys_pub}: "{sys_jwt}"\n  {acc_pub}: "{acc_jwt}"\n}}')
    return Operator(server_conf=conf, creds=creds)
