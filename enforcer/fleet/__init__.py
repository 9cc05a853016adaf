"""Many gateways, one truth: every input that changes a decision goes through one NATS JetStream
stream, and every gateway applies the stream in its order (docs/reference.md, Fleet).

Why JetStream and not a home-made protocol: it already gives a replicated, ordered, durable log
(Raft across a 3-node cluster), publish acknowledgements, de-duplication by message id and a
durable cursor per reader; nats-py is its maintained asyncio client. What is ours is small:
the envelope (``messages``), the connection (``link``), applying in order (``applier``), the door
components publish through (``relay``), heartbeats for ``fleet status`` (``gateways``), each
gateway's clock offset against NATS (``clocks``) and the wiring (``fleet``). The local SQLite
stays each gateway's cache and audit copy.
"""
