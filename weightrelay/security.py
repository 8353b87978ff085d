"""TLS and bearer-token settings, shared by the workers, the coordinator, the client and the health probe.

Both are optional and independent. TLS: the server has a certificate and key, and with a client CA it
requires client certificates (mutual TLS); clients trust a CA. Token: every RPC except the health
service must carry `authorization: Bearer TOKEN`, checked by a server interceptor in constant time;
health stays open so that orchestrators can probe without the secret.
"""

from __future__ import annotations

import argparse
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc

TOKEN_ENV = "WEIGHTRELAY_TOKEN"
TOKEN_FILE_ENV = "WEIGHTRELAY_TOKEN_FILE"
AUTH_HEADER = "authorization"
#: Methods any caller may use without the token: liveness and readiness probes.
OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class SecurityError(ValueError):
    """A TLS file or the token cannot be read; the message names the file and the flag."""


def _read(path: str | Path | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SecurityError(f"{flag} {path}: {exc.strerror}") from None


def resolve_token(token_file: str | Path | None) -> str | None:
    """The token from --token-file, else $WEIGHTRELAY_TOKEN_FILE, else $WEIGHTRELAY_TOKEN; None when none is set."""
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        token = (_read(path, "--token-file") or b"").decode().strip()
        if not token:
            raise SecurityError(f"--token-file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


@dataclass(frozen=True)
class ServerSecurity:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    token: str | None = None

    def credentials(self) -> grpc.ServerCredentials | None:
        if not (self.cert or self.key):
            if self.client_ca:
                raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (self.cert and self.key):
            raise SecurityError("TLS needs both --tls-cert and --tls-key")
        pair = (_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))
        client_ca = _read(self.client_ca, "--tls-client-ca")
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []


@dataclass(frozen=True)
class ClientSecurity:
    ca: str | None = None            # trust this CA (turns TLS on)
    cert: str | None = None          # client certificate and key, for mutual TLS
    key: str | None = None
    token: str | None = None
    server_name: str | None = None   # the name the server's certificate is checked against, when not the host

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        options = list(options or [])
        if self.ca or self.cert:
            if bool(self.cert) != bool(self.key):
                raise SecurityError("a client certificate needs both --tls-cert and --tls-key")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca, "--tls-ca"),
                private_key=_read(self.key, "--tls-key"),
                certificate_chain=_read(self.cert, "--tls-cert"),
            )
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, _TokenSender(self.token)) if self.token else channel


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC outside OPEN_SERVICES without `authorization: Bearer TOKEN` (UNAUTHENTICATED)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if sent is not None and hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._expected):
            return handler
        reason = "no bearer token" if sent is None else "a wrong bearer token"
        return _refusing(handler, f"{handler_call_details.method}: {reason}; send metadata 'authorization: Bearer TOKEN' "
                                  "(coordinator --token-file, or $WEIGHTRELAY_TOKEN)")


#: (request streaming, response streaming) -> gRPC's constructor of a method handler of that shape
HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    def deny(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def deny_stream(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - a generator, as stream responses need

    shape = (handler.request_streaming, handler.response_streaming)
    return HANDLER_KINDS[shape](deny_stream if shape[1] else deny, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)


class _TokenSender(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call of a channel."""

    def __init__(self, token: str):
        self._header = (AUTH_HEADER, f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def add_client_flags(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--tls-ca, --tls-cert, --tls-key, --tls-server-name, --token-file (the coordinator and the health probe)."""
    kwargs: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--tls-ca", help="CA certificate (PEM) that signed the workers' certificates: turns TLS on", **kwargs)
    parser.add_argument("--tls-cert", help="client certificate (PEM), for workers that require mutual TLS", **kwargs)
    parser.add_argument("--tls-key", help="the client certificate's private key (PEM)", **kwargs)
    parser.add_argument("--tls-server-name", help="name to check the workers' certificates against, when not their host", **kwargs)
    parser.add_argument("--token-file", help=f"file holding the bearer token (default ${TOKEN_FILE_ENV}, else ${TOKEN_ENV})", **kwargs)
