"""TLS for the gRPC channel between the gateways and a remote AuthService.

The gateway's side trusts the CA certificates of `auth.tls_ca_file` (and checks the name
`auth.tls_server_name` in the service's certificate, when that is not the host it dials); the
service's side (`stox auth-service`) serves `auth.tls_cert_file` with `auth.tls_key_file`.
Unset, both sides speak plaintext gRPC, as before. A file that cannot be read, or is not PEM,
is a SettingsError naming the setting.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from settings import AuthSettings, SettingsError

PEM = b"-----BEGIN "


def channel_credentials(auth: AuthSettings) -> grpc.ChannelCredentials | None:
    """What the gateway's channel to a remote AuthService uses; None: plaintext."""
    if not auth.tls_ca_file:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read("auth.tls_ca_file", auth))


def channel_options(auth: AuthSettings) -> list[tuple[str, str]]:
    """The name to check in the service's certificate instead of the host dialled."""
    if auth.tls_ca_file and auth.tls_server_name:
        return [("grpc.ssl_target_name_override", auth.tls_server_name)]
    return []


def server_credentials(auth: AuthSettings) -> grpc.ServerCredentials | None:
    """What `stox auth-service` serves with; None: plaintext."""
    if not auth.tls_cert_file:
        return None
    key = _read("auth.tls_key_file", auth)
    return grpc.ssl_server_credentials([(key, _read("auth.tls_cert_file", auth))])


def _read(key: str, auth: AuthSettings) -> bytes:
    path = getattr(auth, key.removeprefix("auth."))
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if PEM not in data:
        raise SettingsError(f"{key}: {path} is not a PEM file")
    return data
