"""Auth settings (``CHATFLOW_AUTH_*``)."""

from __future__ import annotations

from libs.common.settings import ServiceSettings, field


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
    key_cache_s: float = field(30.0, "how long a replica reuses the active signing key it loaded")

    web_client_id: str = field("chatflow-web", "client id of the agent SPA (seed-demo)")
    web_redirect_uri: str = field(
        "https://127.0.0.1:8443/callback", "redirect URI of the agent SPA (seed-demo)"
    )
    web_scopes: str = field("chatflow", "scopes the agent SPA may request (seed-demo)")

    login_max_failures: int = field(10, "failed logins per account per window before 429")
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
