"""Authentication and TLS for both planes, from `SecuritySettings` (config `security:`) and the environment.

What lives here: resolving secrets (environment first, then the config's `SecretStr` fields), the
options a NATS client and a Flight client connect with, the environment a child process gets its
secrets through (never argv), URL redaction for logs, and a throwaway CA + server certificate for
tests and local runs. The servers' side is in `broker/server.py` and `flight_store/server.py`.
docs/security.md is the user's guide.

    python -m asyncflow.security certs DIR [--host 127.0.0.1 --host localhost]

writes DIR/ca.pem, DIR/server.pem and DIR/server.key (needs the `openssl` command).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from asyncflow.config import SecuritySettings
from asyncflow.errors import ConfigError

SecretName = Literal["nats_token", "nats_password", "store_token"]


@dataclass(frozen=True)
class Secrets:
    """The secret values a process needs, resolved once; `SecretStr` so a repr or log shows '**********'."""

    nats_token: SecretStr | None = None
    nats_password: SecretStr | None = None
    store_token: SecretStr | None = None


def _required(settings: SecuritySettings) -> list[SecretName]:
    names: list[SecretName] = []
    if settings.nats_auth == "token":
        names.append("nats_token")
    if settings.nats_auth == "user":
        names.append("nats_password")
    if settings.store_auth == "token":
        names.append("store_token")
    return names


def resolve_secrets(settings: SecuritySettings, environ: Mapping[str, str] | None = None) -> Secrets:
    """The secrets `settings` asks for: each from its `*_env` variable, else the config field.

    Raises ConfigError naming the variable when a required secret is missing or unusable.
    """
    environ = os.environ if environ is None else environ
    found: dict[str, SecretStr] = {}
    for name in _required(settings):
        env_name: str = getattr(settings, f"{name}_env")
        raw = environ.get(env_name)
        value = SecretStr(raw) if raw else getattr(settings, name)
        if value is None or not value.get_secret_value():
            raise ConfigError(
                f"security.{name}: no secret given. Set the environment variable {env_name} "
                f"(security.{name}_env) or security.{name}; the environment is the recommended place"
            )
        text = value.get_secret_value()
        # Control characters cannot travel in a gRPC header or a NATS CONNECT line.
        if any(ord(c) < 32 or ord(c) == 127 for c in text) or text != text.strip():
            raise ConfigError(f"security.{name} (from {env_name} or the config): control characters or "
                              "leading/trailing whitespace are not allowed in a secret")
        found[name] = value
    return Secrets(**found)


def child_env(settings: SecuritySettings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment entries that hand this process's secrets to a child (an actor, a store): each
    under its `*_env` name, so the child resolves exactly what the parent did, with nothing on argv."""
    secrets = resolve_secrets(settings, environ)
    env = {}
    for name in _required(settings):
        value: SecretStr = getattr(secrets, name)
        env[getattr(settings, f"{name}_env")] = value.get_secret_value()
    return env


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"security.{what}: cannot read {path}: {error.strerror or error}") from None


def client_ssl_context(settings: SecuritySettings) -> ssl.SSLContext:
    """TLS context a NATS client verifies the broker with (tls_ca, else the system trust store)."""
    if settings.tls_ca is not None:
        _read(settings.tls_ca, "tls_ca")  # a clear error now rather than an SSL one later
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca) if settings.tls_ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def nats_connect_options(settings: SecuritySettings | None,
                         environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` (token, user/password, tls) that `settings` calls for."""
    if settings is None:
        return {}
    secrets = resolve_secrets(settings, environ)
    options: dict[str, Any] = {}
    if secrets.nats_token is not None:
        options["token"] = secrets.nats_token.get_secret_value()
    if secrets.nats_password is not None:
        options["user"] = settings.nats_user
        options["password"] = secrets.nats_password.get_secret_value()
    if settings.nats_tls:
        options["tls"] = client_ssl_context(settings)
    return options


def store_client_options(settings: SecuritySettings | None,
                         environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for `StoreClient(locations, **options)`: CA, token and whether TLS is required."""
    if settings is None:
        return {}
    secrets = resolve_secrets(settings, environ)
    return {
        "tls_root_certs": _read(settings.tls_ca, "tls_ca") if settings.store_tls and settings.tls_ca else None,
        "token": secrets.store_token,
        "require_tls": settings.store_tls,
    }


def store_server_args(settings: SecuritySettings) -> list[str]:
    """Command-line flags of `python -m flight_store.server` for `settings`: paths and the *name* of
    the token variable only; the token itself reaches the store through `child_env`."""
    args: list[str] = []
    if settings.store_tls:
        args += ["--tls-cert", str(settings.tls_cert), "--tls-key", str(settings.tls_key)]
    if settings.store_auth == "token":
        args += ["--token-env", settings.store_token_env]
    return args


def check_launch(settings: SecuritySettings, *, starts_broker: bool, starts_stores: bool,
                 environ: Mapping[str, str] | None = None) -> None:
    """Fail before anything starts: every secret present, every certificate file readable."""
    resolve_secrets(settings, environ)
    servers_need_tls = (starts_broker and settings.nats_tls) or (starts_stores and settings.store_tls)
    if servers_need_tls:
        if settings.tls_cert is None or settings.tls_key is None:
            plane = "nats_tls" if starts_broker and settings.nats_tls else "store_tls"
            raise ConfigError(f"security.{plane} is on and the launcher starts the server, so it needs "
                              "security.tls_cert and security.tls_key (see docs/security.md)")
        _read(settings.tls_cert, "tls_cert")
        _read(settings.tls_key, "tls_key")
    if settings.tls_ca is not None and (settings.nats_tls or settings.store_tls):
        _read(settings.tls_ca, "tls_ca")


def redact_url(url: str) -> str:
    """`url` without any user:password@ part, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- certificates for tests and local runs ----------------------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    """Where `make_certificates` wrote the CA certificate, the server certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(out_dir: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                      days: int = 30, timeout_s: float = 60.0) -> CertificateFiles:
    """A throwaway CA and a server certificate it signed for `hosts` (IPs and DNS names), with
    `openssl`. For tests and trying TLS out; production certificates come from your own CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("make_certificates needs the `openssl` command (apt-get install openssl)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = out_dir / "ca.pem", out_dir / "ca.key"
    cert, key, csr, ext = out_dir / "server.pem", out_dir / "server.key", out_dir / "server.csr", out_dir / "server.ext"
    names = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    ext.write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", str(days),
         "-subj", "/CN=AsyncFlow throwaway CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(cert), "-days", str(days), "-extfile", str(ext)],
    ]
    for command in steps:
        # umask in the child only: keys are never readable by others, not even for a moment.
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False,
                              preexec_fn=lambda: os.umask(0o077))
        if done.returncode != 0:
            raise ConfigError(f"openssl {command[1]} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    for private in (key, ca_key):
        private.chmod(0o600)
    for public in (ca, cert):
        public.chmod(0o644)  # certificates are public; only the keys stay private
    return CertificateFiles(ca=ca, cert=cert, key=key)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncflow.security", description="TLS helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="write a throwaway CA and a server certificate (ca.pem, server.pem, server.key)")
    certs.add_argument("out_dir", type=Path)
    certs.add_argument("--host", action="append", default=[],
                       help="IP or DNS name the certificate is for (repeatable; default 127.0.0.1 and localhost)")
    certs.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    files = make_certificates(args.out_dir, args.host or ["127.0.0.1", "localhost"], args.days)
    print(f"CA {files.ca}\ncertificate {files.cert}\nkey {files.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
