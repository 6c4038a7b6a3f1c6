"""Security: roles and the visibility rule (``roles``), trusted proxies (``proxies``), OIDC signing keys
(``jwks``), and the request's identity from a bearer token or an identity proxy (``auth``).

``roles``, ``proxies`` and ``jwks`` sit just above the base modules and import only them. ``auth`` reads
requests with flask-jwt-extended, so it belongs to the web layer (tests/test_architecture.py).
"""
