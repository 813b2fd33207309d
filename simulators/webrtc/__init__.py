"""WebRTC peer networks: many aiortc peers and a few real Chromium peers in one room.

The family brings the Catalyst peer performance test (seed-systems.md §3) into harness. Peers find
each other through the `lighthouse` target (layers, rooms, WebSocket signalling), connect directly by
WebRTC data channels, run routines on a ~60 Hz tick (position every 100 ms and profile every 1 s on
an unreliable channel, chat every 10 s on a reliable one), relay each other's packets with the
original's ttl/hops rules, and publish a data point per peer every stats interval with the seven
packet families (sent, received, relayed, all, relevant, duplicate, expired).

Modules:

- `protocol`   the wire format, message types, per-peer statistics and the packet classification
               (pure logic; the browser client in `client/peer.js` implements the same rules)
- `routines`   what a peer does on each tick; pluggable and chosen per peer
- `signalling` the lighthouse client (REST for layers and rooms, WebSocket for offers and answers)
- `peer`       one aiortc peer: connections, two data channels each, sending, relaying, pings
- `peers`      the `webrtc-peer` simulator: many aiortc peers per worker
- `browser`    the `webrtc-browser` simulator: one real headless Chromium per user (Selenium)
- `page_server` what a browser worker serves: the client page and a results API for its run
- `common`     options and helpers both simulators share

Everything stays on 127.0.0.1: aioice is pinned to loopback (`peer.pin_loopback`) and every SDP
is filtered to loopback candidates, in Python and in the browser.
"""
