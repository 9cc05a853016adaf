"""The DNS-driven walled garden (``walled_garden.dns: gateway``; docs/reference.md).

Payment sites live behind CDNs whose addresses change per query and per resolver, so a list of
addresses, or names the gateway resolves for itself, cannot follow them. Instead the table
redirects a restricted subscriber's DNS (UDP and TCP 53, to any address) to a forwarder the
daemon runs in a process of its own; the forwarder passes every answer through unchanged and,
for names in ``walled_garden.allow`` (exact or ``*.suffix``), puts the answer's addresses in the
``dnsgarden`` timeout sets *before* the answer leaves, so the customer's first connection works.

A process of its own, because DNS is untrusted input at a rate of its own: parsing it must not
share the daemon's event loop and GIL with enforcement, and a crash there must not take
enforcement down. The parts:

* ``settings``: the forwarder's whole configuration, built by the daemon from its config;
* ``names``: which query names are allowed; ``answers``: the addresses an answer gives them;
* ``limits``: per-subscriber query rate; ``upstream``: the resolvers, over UDP and TCP;
* ``forwarder``: the listeners and the path of one query; ``stats``: counters for the daemon;
* ``garden_set``: the kernel writer (the ``dnsgarden`` sets); ``process``: the child's main;
* ``bridge``: the daemon's side: starts, supervises and reads the child.
"""
