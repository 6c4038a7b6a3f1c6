"""A tiny OIDC-style JWKS endpoint on 127.0.0.1 for the tests: the real protocol (HTTP GET of a JSON Web
Key Set), real RSA/EC keys, and a switchboard for rotation and outages. It stands in for the
university's identity provider, which cannot run here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://idp.test.ed.ac.uk"
AUDIENCE = "campus-search"


class JwksServer:
    """``with JwksServer() as idp: idp.add_key("k1"); idp.publish("k1"); token = idp.sign({...}, "k1")``."""

    def __init__(self) -> None:
        self.private: dict[str, Any] = {}
        self.algs: dict[str, str] = {}
        self.published: list[str] = []
        self.hits = 0
        self.status = 200  # set to 500 to simulate an outage
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with server._lock:
                    server.hits += 1
                    body = json.dumps(server.jwks()).encode()
                    status = server.status
                if self.path != "/jwks.json":
                    status, body = 404, b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_key(self, kid: str, alg: str = "RS256") -> Any:
        key = self.private[kid] = generate_key(alg)
        self.algs[kid] = alg
        return key

    def publish(self, *kids: str) -> None:
        with self._lock:
            self.published = list(kids)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            public = self.private[kid].public_key()
            family = jwt.algorithms.ECAlgorithm if self.algs[kid].startswith("ES") else jwt.algorithms.RSAAlgorithm
            jwk = family.to_jwk(public, as_dict=True)
            jwk.update(kid=kid, alg=self.algs[kid], use="sig")
            keys.append(jwk)
        return {"keys": keys}

    def public_pem(self, kid: str) -> bytes:
        return self.private[kid].public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, claims: dict[str, Any], kid: str, *, alg: str | None = None, ttl: int = 600,
             key: Any = None) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + ttl, **claims}
        alg = alg or self.algs.get(kid, "RS256")
        return jwt.encode(body, key or self.private[kid], algorithm=alg, headers={"kid": kid})


def generate_key(alg: str = "RS256") -> Any:
    """A fresh private key for ``alg`` (also the attacker's key in tests)."""
    if alg.startswith("ES"):
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes | None = None,
              hmac_key: bytes | None = None) -> str:
    """A JWT assembled by hand: for tokens PyJWT refuses to make (``alg: none``, HS256 keyed with a
    public key's PEM -- the algorithm-confusion attack)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature or b'')}"
