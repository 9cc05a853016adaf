"""The captive portal: what a restricted subscriber sees instead of the web (docs/reference.md, Portal).

It runs unprivileged (``walled-garden portal``) and holds no state of its own: whether a
caller is restricted, and why, is asked of the enforcer over its control socket. Plain HTTP
that the gateway redirects here is answered with a fast ``302`` to ``portal.url`` without any
lookup; only the portal's own page and its RFC 8908 API ask the enforcer.

Modules, each one concept: ``portal_url`` (is a request addressed to us?), ``enforcer_client``
(the lookup over the control socket; its messages are ``enforcer.control_protocol``'s),
``language`` and ``messages`` (localisation), ``branding`` (what an ISP configures), ``page``
(the HTML), ``config_check`` (the portal's part of ``check-config``), ``metrics``, ``app``
(routes and middlewares) and ``server`` (sockets, signals).

From ``enforcer`` the portal imports only shared leaf modules (config, model,
control_protocol, logs, systemd_notify, ...), never the daemon's.
"""
