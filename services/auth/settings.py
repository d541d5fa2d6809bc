"""Auth settings (``CHATFLOW_AUTH_*``)."""

from __future__ import annotations

from typing import Self

from pydantic import model_validator

from libs.common.settings import ServiceSettings, field
from libs.common.tokens import TokenVerifier


class AuthSettings(ServiceSettings):
    service = "auth"
    http_port: int = 8102

    access_token_ttl_s: int = field(900, "lifetime of access tokens (JWT), seconds")
    refresh_token_ttl_s: int = field(
        14 * 86400, "idle lifetime of a refresh token; every rotation starts it again"
    )
    refresh_family_ttl_s: int = field(
        30 * 86400, "absolute lifetime of a refresh-token family (one login), seconds"
    )
    auth_code_ttl_s: int = field(60, "lifetime of an authorization code, seconds")
    retired_key_grace_s: int = field(
        3 * 3600, "a retired signing key stays published this long (longer than any token)"
    )
    key_cache_s: float = field(
        30.0, "how long a replica reuses the signing-key schedule it loaded, seconds"
    )
    key_publish_lead_s: float = field(
        15.0,
        "a rotated key is published this long before it signs; must exceed the verifiers' "
        "minimum JWKS refetch interval (5 s) plus the outbox relay's delay",
    )
    jwks_check_interval_s: float = field(
        3.0,
        "how often auth checks that auth.jwks still holds the current keys (a Redis that "
        "restarted empty does not) and publishes them again if not, seconds",
    )

    web_client_id: str = field("chatflow-web", "client id of the agent SPA (seed-demo)")
    web_redirect_uri: str = field(
        "https://127.0.0.1:8443/callback", "redirect URI of the agent SPA (seed-demo)"
    )
    web_scopes: str = field("chatflow", "scopes the agent SPA may request (seed-demo)")

    login_max_failures: int = field(
        10, "failed logins per account from one client IP per window before 429"
    )
    login_max_failures_account: int = field(
        100, "failed logins per account from every IP together per window before 429"
    )
    login_max_failures_ip: int = field(100, "failed logins per client IP per window before 429")
    login_window_s: int = field(900, "login-throttle window, seconds")
    trusted_proxies: str = field(
        "127.0.0.1,::1", "peers whose X-Forwarded-For is believed (comma-separated)"
    )
    csrf_cookie: str = field("__Host-chatflow_csrf", "name of the login form's CSRF cookie")

    argon2_time_cost: int = field(3, "argon2id iterations (RFC 9106 second recommendation)")
    argon2_memory_kib: int = field(65536, "argon2id memory, KiB")
    argon2_parallelism: int = field(4, "argon2id lanes")
    argon2_concurrency: int = field(4, "password hashes computed at once (bounds memory use)")

    bench_token_ttl_s: int = field(7200, "lifetime of tokens minted by the bench-agents tool")
    bench_client_id: str = field("chatflow-bench", "client_id claim of bench-agents tokens")
    sweep_interval_s: float = field(600.0, "how often expired codes and refresh tokens are removed")

    @model_validator(mode="after")
    def _key_rotation_is_safe(self) -> Self:
        """Refuse settings under which a rotation could make valid tokens fail to verify."""
        if self.key_publish_lead_s <= TokenVerifier.min_refetch_s:
            raise ValueError(
                f"key_publish_lead_s must exceed the verifiers' minimum refetch interval "
                f"({TokenVerifier.min_refetch_s:g} s)"
            )
        if self.retired_key_grace_s < self.access_token_ttl_s + self.jwt_leeway_s:
            raise ValueError("retired_key_grace_s must cover access_token_ttl_s + jwt_leeway_s")
        return self
