"""The captive portal: what a restricted subscriber sees instead of the web (SPEC §5).

It runs unprivileged (``walled-garden portal``) and holds no state of its own: whether a
caller is restricted, and why, is asked of the enforcer over its control socket. Plain HTTP
that the gateway redirects here is answered with a fast ``302`` to ``portal.url`` without any
lookup; only the portal's own page and its RFC 8908 API ask the enforcer.

Modules, each one concept: ``portal_url`` (is a request addressed to us?), ``enforcer_client``
(the lookup over the control socket), ``language`` and ``messages`` (localisation), ``page``
(the HTML), ``metrics``, ``app`` (routes and middlewares) and ``server`` (sockets, signals).
"""
