"""Sessions: where a subscriber is on the network right now.

Billing knows subscribers by id; DHCP servers and BNGs hand out addresses. A ``Session`` says
"these addresses belong to whoever has these match keys (username, MAC, circuit/remote id),
until then". Sources (``dnsmasq``, ``kea``, ``radius``; session events and the CLI come in
through the daemon's own doors) report sessions to a ``SessionSink``; the ``SessionBook``
merges them, and the policy adds a subscriber's session addresses to what it restricts.
"""
