"""The security headers of the service's HTML pages, /docs and /admin alike."""

from __future__ import annotations

from urllib.parse import urlsplit

from chalicelib.settings import Settings


def content_security_policy(settings: Settings) -> str:
    """Scripts, styles and calls from this origin only; the token endpoint when SSO is on.

    Swagger UI on /docs sets element styles from script (allowed) and draws icons as data:
    images; neither page has an inline script.
    """
    connect = ["'self'"]
    if settings.oidc_token_url:
        parts = urlsplit(settings.oidc_token_url)
        connect.append(f"{parts.scheme}://{parts.netloc}")
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {' '.join(connect)}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def page_security_headers(settings: Settings) -> dict[str, str]:
    """The headers every HTML page sends: one policy, so /docs cannot lag behind /admin."""
    return {
        "Content-Security-Policy": content_security_policy(settings),
        # Older browsers ignore frame-ancestors; both say: never inside another site's frame.
        "X-Frame-Options": "DENY",
        # The sign-in callback carries the authorization code in the URL, and /docs a token
        # typed into "Authorize" may sit in the page: nothing leaks through a Referer.
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        # A page opened from another site cannot reach into this one through window.opener.
        "Cross-Origin-Opener-Policy": "same-origin",
    }
