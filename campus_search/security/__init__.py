"""Security: identity (bearer tokens, JWKS, trusted proxies), roles and the visibility rule."""
