/*
 * harness webrtc browser peer: the Catalyst peer performance test client (seed-systems.md §3.2) in plain
 * JavaScript, speaking the harness peer protocol (simulators/webrtc/protocol.py; the shared spec §2).
 *
 * A page runs `numberOfPeers` peers. Each one opens a WebSocket to the lighthouse (`/signal?id=`), joins
 * the layer and the room over REST, connects to up to minConnections room members (two data channels per
 * connection: `reliable` and `unreliable`, non-trickle SDP kept to 127.0.0.1 candidates), runs its routine
 * on a ~60 Hz tick, relays and classifies every packet like the original, pings its connections and PUTs a
 * data point to `{statsServerUrl}/test/{testId}/peer/{peerId}/metrics` every statsSubmitInterval.
 *
 * For Selenium: `window.harnessPeer` (state, error, connected, counts, peers), `window.harnessTakeOps()`
 * (timed operations, failures and counter increments since the last call), `window.harnessStop()` (a
 * promise: final stats, LEAVE to every connection, close) and `window.harnessPairs()` (every ICE
 * candidate pair, to check that only 127.0.0.1 is used). The console says "Test finished" or
 * "Test aborted", like the original.
 *
 * Loopback only: the page never asks for media permission, so Chromium binds its ICE sockets to the
 * wildcard address; `localSdp` announces them as 127.0.0.1 and every SDP received keeps only 127.0.0.1
 * candidates (see `localSdp`).
 */
(function () {
  "use strict";

  const FAMILIES = ["sent", "received", "relayed", "all", "relevant", "duplicate", "expired"];
  const DEFAULT_EXPIRE_MS = 10000;
  const MAX_RECEIVED_FROM = 64;
  const MAX_DELIVERIES = 20000;
  const MAX_OPS = 2000;
  const REST_RETRIES = 5;
  const BACKOFF_MS = 10000;
  const TOP_UP_EVERY_MS = 3000;
  const START_POLL_MS = 3000;
  const START_GIVE_UP_MS = 600000;

  // ---- parameters (the original client's, plus the harness's) -------------------------------------
  const query = new URLSearchParams(location.search);
  function num(name, fallback) {
    const v = query.get(name);
    if (v === null || v === "") return fallback;
    const n = Number(v);
    return Number.isFinite(n) ? n : fallback;
  }
  function list(name) {
    const v = query.get(name);
    return v ? v.split(",").map((s) => s.trim()).filter((s) => s) : [];
  }
  const periods = list("periods").map(Number);
  const cfg = {
    numberOfPeers: Math.max(1, Math.floor(num("numberOfPeers", 1))),
    testDurationMs: num("testDuration", 180) * 1000,
    statsSubmitInterval: num("statsSubmitInterval", 2000),
    lighthouseUrl: (query.get("lighthouseUrl") || "http://localhost:9000").replace(/\/+$/, ""),
    statsServerUrl: (query.get("statsServerUrl") || "http://localhost:9904").replace(/\/+$/, ""),
    testId: query.get("testId") || null,
    pingIntervalMs: num("pingInterval", 9) * 1000,
    peerIds: list("peerId"),
    routines: list("routine"),
    layer: query.get("layer") || "blue",
    room: query.get("room") || "room",
    minConnections: num("minConnections", null),
    maxConnections: num("maxConnections", null),
    positionMs: periods[0] > 0 ? periods[0] : 100,
    profileMs: periods[1] > 0 ? periods[1] : 1000,
    chatMs: periods[2] > 0 ? periods[2] : 10000,
    startJitterMs: num("startJitter", 3000),
    tickMs: num("tickMs", 16),
    connectTimeoutMs: num("connectTimeout", 10) * 1000,
    area: num("area", 32),
    anyAddress: query.get("anyAddress") !== "0",
    debug: query.get("debug") === "1",
  };
  function debug(...args) {
    if (cfg.debug) console.log(...args);
  }

  // ---- small helpers ------------------------------------------------------------------------------
  const encoder = new TextEncoder();
  function utf8Length(s) {
    for (let i = 0; i < s.length; i++) {
      if (s.charCodeAt(i) > 127) return encoder.encode(s).length;
    }
    return s.length;
  }
  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }
  function uuid4() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }
  function randomText(n) {
    const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let out = "";
    for (let i = 0; i < n; i++) out += alphabet[Math.floor(Math.random() * alphabet.length)];
    return out;
  }
  function randomPeerId() {
    let out = "0x";
    for (let i = 0; i < 40; i++) out += "0123456789abcdef"[Math.floor(Math.random() * 16)];
    return out;
  }
  function oneLine(e) {
    const s = e && e.message ? e.message : String(e);
    return s.split("\n")[0].slice(0, 300);
  }
  function shuffle(a) {
    for (let i = a.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [a[i], a[j]] = [a[j], a[i]];
    }
    return a;
  }
  /** Keep only the ICE candidates on 127.0.0.1: applied to every SDP received (loopback only, always). */
  function filterSdp(sdp) {
    return sdp
      .split(/\r?\n/)
      .filter((line) => !line.startsWith("a=candidate:") || line.split(" ")[4] === "127.0.0.1")
      .join("\r\n");
  }
  /**
   * The SDP this peer sends: its 127.0.0.1 candidates only.
   *
   * A page without media permission (this one never asks for it) gets ICE sockets bound to the wildcard
   * address, announced with the default route's address (or an mDNS name). Such a socket is reachable on
   * 127.0.0.1 and, sending to 127.0.0.1, sends from 127.0.0.1; so when no candidate is on 127.0.0.1 and
   * `anyAddress` is on (the default), its IPv4 UDP host candidates are announced as 127.0.0.1. A page that
   * enumerates interfaces (media permission, --allow-loopback-in-peer-connection) has a real 127.0.0.1
   * candidate and keeps only that one — but it also checks from its other interfaces' sockets, which the
   * simulator avoids by never granting the permission.
   */
  function localSdp(sdp) {
    const lines = sdp.split(/\r?\n/);
    const loopback = lines.some((l) => l.startsWith("a=candidate:") && l.split(" ")[4] === "127.0.0.1");
    const out = [];
    for (const line of lines) {
      if (line.startsWith("a=candidate:")) {
        const f = line.split(" ");
        if (f[4] === "127.0.0.1") out.push(line);
        else if (!loopback && cfg.anyAddress && f[2].toLowerCase() === "udp" && f[7] === "host" && !f[4].includes(":")) {
          f[4] = "127.0.0.1";
          out.push(f.join(" "));
        }
      } else if (line.startsWith("c=IN IP4 ") && line !== "c=IN IP4 0.0.0.0") {
        out.push("c=IN IP4 127.0.0.1");
      } else if (line.startsWith("c=IN IP6 ")) {
        out.push("c=IN IP4 0.0.0.0");
      } else {
        out.push(line);
      }
    }
    return out.join("\r\n");
  }
  function hasCandidate(sdp) {
    return sdp.indexOf("a=candidate:") >= 0;
  }
  function gathered(pc, timeoutMs) {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(resolve, timeoutMs);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  // ---- what Selenium reads ------------------------------------------------------------------------
  const ops = [];
  /** A timed operation (`ms`) or a failure (`ok: false`, one-line `error`), or a counter increment. */
  function op(entry) {
    if (ops.length < MAX_OPS) ops.push(entry);
  }
  function fail(name, error, ms) {
    op({ name, ms: ms || 0, ok: false, error: oneLine(error) });
  }
  const status = (window.harnessPeer = {
    state: "loading",
    error: null,
    connected: 0,
    counts: {},
    peers: [],
    joinMs: null,
  });
  window.harnessTakeOps = () => ops.splice(0, ops.length);
  /** Every ICE candidate pair of every connection with its addresses and check counts (for tests). */
  window.harnessPairs = async () => {
    const out = [];
    for (const p of peers) {
      for (const c of p.conns.values()) {
        const report = await c.pc.getStats();
        const cands = {};
        report.forEach((s) => {
          if (s.type === "local-candidate" || s.type === "remote-candidate") cands[s.id] = s;
        });
        report.forEach((s) => {
          if (s.type !== "candidate-pair") return;
          const l = cands[s.localCandidateId] || {};
          const r = cands[s.remoteCandidateId] || {};
          out.push({
            peer: c.peer,
            local: `${l.address}:${l.port}/${l.protocol}/${l.candidateType}`,
            remote: `${r.address}:${r.port}/${r.protocol}/${r.candidateType}`,
            state: s.state,
            nominated: !!s.nominated,
            requestsSent: s.requestsSent || 0,
            responsesSent: s.responsesSent || 0,
            requestsReceived: s.requestsReceived || 0,
            bytesSent: s.bytesSent || 0,
          });
        });
      }
    }
    return out;
  };
  window.addEventListener("error", (e) => fail("page error", e.message || "script error"));
  window.addEventListener("unhandledrejection", (e) => fail("page error", e.reason));

  // ---- message types (the original's messageTypes.ts) ---------------------------------------------
  function reliable(name) {
    return { name, ttl: 10, exp: 20000, dot: -1, opt: false, channel: "reliable" };
  }
  function unreliable(name) {
    return { name, ttl: 10, exp: 2000, dot: 0, opt: true, channel: "unreliable" };
  }
  const PING = { name: "ping", ttl: 1, exp: -1, dot: -1, opt: false, channel: "reliable" };
  const PONG = { name: "pong", ttl: 1, exp: -1, dot: -1, opt: false, channel: "reliable" };
  const POSITION = unreliable("position");
  const PROFILE = unreliable("profile");
  const CHAT = reliable("chat");

  // ---- statistics ---------------------------------------------------------------------------------
  class Stats {
    constructor() {
      this.f = {};
      for (const name of FAMILIES) this.f[name] = { p: 0, b: 0, tp: 0, tb: 0 };
      this.last = performance.now();
    }
    count(name, bytes) {
      const f = this.f[name];
      f.p += 1;
      f.b += bytes;
      f.tp += 1;
      f.tb += bytes;
    }
    /** The 49 fields of a data point for the period since the last snapshot. */
    snapshot() {
      const now = performance.now();
      const elapsed = now - this.last;
      this.last = now;
      const out = {};
      for (const name of FAMILIES) {
        const f = this.f[name];
        out[name] = f.p;
        out[`${name}Total`] = f.tp;
        out[`${name}PerSecond`] = elapsed > 0 ? (f.p * 1000) / elapsed : 0;
        out[`${name}Bytes`] = f.b;
        out[`${name}TotalBytes`] = f.tb;
        out[`${name}BytesPerSecond`] = elapsed > 0 ? (f.b * 1000) / elapsed : 0;
        out[`${name}AveragePacketSize`] = f.tp ? f.tb / f.tp : 0;
        f.p = 0;
        f.b = 0;
      }
      return out;
    }
    totals() {
      const out = {};
      for (const name of FAMILIES) out[name] = this.f[name].tp;
      return out;
    }
  }

  // ---- routines -----------------------------------------------------------------------------------
  class PeriodicAction {
    constructor(period, action) {
      this.period = period;
      this.action = action;
      this.acc = 0;
    }
    run(delta) {
      this.acc += delta;
      if (this.acc > this.period) {
        this.action();
        this.acc = 0;
      }
    }
  }
  function positionData(peer) {
    const [x, y, z] = peer.position;
    return {
      time: Date.now(),
      positionData: {
        positionX: x,
        positionY: y,
        positionZ: z,
        rotationX: 0,
        rotationY: 0,
        rotationZ: 0,
        rotationW: 0,
      },
    };
  }
  function loops(peer, walk) {
    const actions = [
      new PeriodicAction(cfg.positionMs, () => {
        if (walk) {
          const clamp = (v) => Math.max(-cfg.area, Math.min(cfg.area, v));
          peer.position[0] = clamp(peer.position[0] + (Math.random() * 2 - 1) * 0.5);
          peer.position[2] = clamp(peer.position[2] + (Math.random() * 2 - 1) * 0.5);
        }
        peer.sendMessage(cfg.room, positionData(peer), POSITION);
      }),
      new PeriodicAction(cfg.profileMs, () =>
        peer.sendMessage(
          cfg.room,
          { time: Date.now(), profileData: { userId: peer.id, profileVersion: "1" } },
          PROFILE,
        ),
      ),
      new PeriodicAction(cfg.chatMs, () =>
        peer.sendMessage(
          cfg.room,
          { time: Date.now(), chatData: { messageId: uuid4(), text: randomText(40) } },
          CHAT,
        ),
      ),
    ];
    return (elapsed, delta) => {
      for (const a of actions) a.run(delta);
    };
  }
  const ROUTINES = {
    catalyst: (peer) => loops(peer, false),
    walk: (peer) => loops(peer, true),
    silent: () => () => {},
  };

  // ---- one peer -----------------------------------------------------------------------------------
  class Peer {
    constructor(id, routine) {
      this.id = id;
      this.routineName = ROUTINES[routine] ? routine : "catalyst";
      this.routine = ROUTINES[this.routineName](this);
      this.inst = crypto.getRandomValues(new Uint32Array(1))[0];
      this.seq = 0;
      this.position = [(Math.random() * 2 - 1) * cfg.area, 0, (Math.random() * 2 - 1) * cfg.area];
      this.stats = new Stats();
      this.known = new Map(); // layer members: id -> {timestamp, tsByType, seqByType, position}
      this.roomMembers = new Set();
      this.rooms = new Set();
      this.conns = new Map(); // peer id -> connection
      this.backoff = new Map(); // peer id -> time before which we do not offer again
      this.receivedPackets = new Map(); // key -> {t, exp}
      this.latencies = new Map(); // peer id -> latest RTT ms
      this.pings = new Map(); // `${peer}|${id}` -> sent time
      this.pingId = 0;
      this.receivedFrom = {};
      this.receivedFromCount = 0;
      this.deliveries = {};
      this.deliveryCount = 0;
      this.timers = [];
      this.state = "new";
      this.joinMs = null;
      this.maxConns = cfg.maxConnections || 8;
      this.minConns = cfg.minConnections || 4;
      this.submitting = false;
      this.stopped = false;
    }

    // -- lighthouse -------------------------------------------------------------------------------
    async rest(method, path, body) {
      let last = null;
      for (let attempt = 0; attempt <= REST_RETRIES; attempt++) {
        try {
          const r = await fetch(cfg.lighthouseUrl + path, {
            method,
            headers: { "Content-Type": "application/json" },
            body: body === undefined ? undefined : JSON.stringify(body),
          });
          const j = await r.json().catch(() => null);
          if (r.ok) return j;
          last = new Error(`${method} ${path.split("/").slice(0, 2).join("/")}: ${r.status} ${(j && j.status) || ""}`);
          if (r.status < 500 && r.status !== 429) break;
        } catch (e) {
          last = new Error(`${method} lighthouse: ${oneLine(e)}`);
        }
        await sleep(1000);
      }
      throw last;
    }

    openSocket() {
      return new Promise((resolve, reject) => {
        const url = cfg.lighthouseUrl.replace(/^http/, "ws") + "/signal?id=" + encodeURIComponent(this.id);
        const ws = (this.ws = new WebSocket(url));
        const timer = setTimeout(() => reject(new Error("lighthouse socket: no OPEN within 10 s")), 10000);
        ws.onmessage = (e) => {
          let m;
          try {
            m = JSON.parse(e.data);
          } catch (err) {
            fail("signal", "lighthouse sent a frame that is not JSON");
            return;
          }
          if (m.type === "OPEN") {
            clearTimeout(timer);
            const p = m.payload || {};
            if (!cfg.maxConnections && p.maxConnections) this.maxConns = p.maxConnections;
            if (!cfg.minConnections && p.minConnections) this.minConns = p.minConnections;
            this.minConns = Math.min(this.minConns, this.maxConns);
            resolve();
          } else if (m.type === "ID-TAKEN") {
            clearTimeout(timer);
            reject(new Error("lighthouse socket: peer id taken"));
          } else {
            this.onSignal(m);
          }
        };
        ws.onerror = () => {
          clearTimeout(timer);
          reject(new Error("lighthouse socket: connection failed"));
        };
        ws.onclose = () => {
          if (!this.stopped && this.state === "running") {
            fail("signal", "lighthouse socket closed");
            this.state = "disconnected";
          }
        };
      });
    }

    signal(type, dst, payload) {
      debug("signal >", type, dst, JSON.stringify(payload || {}).slice(0, 2000));
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type, dst, payload }));
    }

    addKnown(id) {
      if (id && id !== this.id && !this.known.has(id)) {
        this.known.set(id, { timestamp: undefined, tsByType: {}, seqByType: {}, position: null });
      }
    }

    async start() {
      const t0 = performance.now();
      this.state = "joining";
      await this.openSocket();
      const user = { userId: this.id, peerId: this.id };
      const layerUsers = await this.rest("PUT", `/layers/${encodeURIComponent(cfg.layer)}`, {
        ...user,
        protocolVersion: 5,
      });
      for (const u of layerUsers || []) this.addKnown(u.peerId);
      const roomUsers = await this.rest(
        "PUT",
        `/layers/${encodeURIComponent(cfg.layer)}/rooms/${encodeURIComponent(cfg.room)}`,
        user,
      );
      this.rooms.add(cfg.room);
      for (const u of roomUsers || []) {
        if (u.peerId !== this.id) {
          this.roomMembers.add(u.peerId);
          this.addKnown(u.peerId);
        }
      }
      this.joinMs = performance.now() - t0;
      op({ name: "join room", ms: this.joinMs, ok: true });
      this.state = "running";
      this.every(cfg.statsSubmitInterval, () => this.submit());
      this.every(cfg.pingIntervalMs, () => this.ping());
      this.every(1000, () => this.purge());
      this.every(TOP_UP_EVERY_MS, () => this.topUp());
      this.topUp();
    }

    every(ms, fn) {
      this.timers.push(setInterval(fn, ms));
    }

    onSignal(m) {
      const p = m.payload || {};
      debug("signal <", m.type, m.src, JSON.stringify(p).slice(0, 2000));
      switch (m.type) {
        case "PEER_JOINED_LAYER":
          this.addKnown(p.peerId);
          break;
        case "PEER_LEFT_LAYER":
          this.known.delete(p.userId);
          this.roomMembers.delete(p.userId);
          this.latencies.delete(p.userId);
          if (this.conns.has(p.userId)) this.drop(this.conns.get(p.userId), false);
          break;
        case "PEER_JOINED_ROOM":
          if (p.roomId === cfg.room && p.peerId !== this.id) {
            this.roomMembers.add(p.peerId);
            this.addKnown(p.peerId);
          }
          break;
        case "PEER_LEFT_ROOM":
          if (p.roomId === cfg.room) this.roomMembers.delete(p.userId);
          break;
        case "OFFER":
          this.onOffer(m.src, p).catch(() => op({ counter: "webrtc_answers_failed", value: 1 }));
          break;
        case "ANSWER":
          this.onAnswer(m.src, p).catch((e) => fail("connect", e));
          break;
        case "REJECT": {
          const c = this.conns.get(m.src);
          if (c && c.initiator && (!p.sessionId || p.sessionId === c.sessionId)) {
            op({ counter: "webrtc_offers_rejected", value: 1 });
            this.backoff.set(m.src, Date.now() + BACKOFF_MS);
            this.drop(c, false);
          }
          break;
        }
        case "LEAVE": {
          const c = this.conns.get(m.src);
          if (c) this.drop(c, false);
          break;
        }
        case "EXPIRE": {
          const c = this.conns.get(m.src);
          this.roomMembers.delete(m.src);
          if (c) this.drop(c, false);
          break;
        }
        case "CANDIDATE":
          break; // non-trickle: the SDP carries the candidates
        case "ERROR":
          fail("signal", `lighthouse: ${p.message || "error"}`);
          break;
        default:
          break;
      }
    }

    // -- connections ------------------------------------------------------------------------------
    connected() {
      const out = [];
      for (const c of this.conns.values()) if (c.state === "connected") out.push(c);
      return out;
    }

    topUp() {
      if (this.state !== "running" || this.stopped) return;
      let missing = this.minConns - this.conns.size;
      if (missing <= 0) return;
      const now = Date.now();
      const candidates = shuffle(
        Array.from(this.roomMembers).filter(
          (id) => !this.conns.has(id) && !((this.backoff.get(id) || 0) > now),
        ),
      );
      for (const id of candidates) {
        if (missing-- <= 0) break;
        this.offer(id).catch((e) => fail("connect", e));
      }
    }

    newConn(remote, sessionId, initiator) {
      const pc = new RTCPeerConnection({ iceServers: [] });
      const c = { peer: remote, pc, sessionId, initiator, state: "connecting", channels: {}, t0: performance.now() };
      this.conns.set(remote, c);
      c.timer = setTimeout(() => {
        if (c.state !== "connected" && !c.closed) {
          if (initiator) {
            const reason = `peer connection not open within ${cfg.connectTimeoutMs / 1000}s (ice ${pc.iceConnectionState})`;
            fail("connect", reason, cfg.connectTimeoutMs);
          } else {
            op({ counter: "webrtc_answers_failed", value: 1 });
          }
          this.backoff.set(remote, Date.now() + BACKOFF_MS);
          this.drop(c, true);
        }
      }, cfg.connectTimeoutMs);
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "failed" || pc.connectionState === "closed") this.drop(c, false);
      };
      pc.ondatachannel = (e) => this.wire(c, e.channel);
      return c;
    }

    wire(c, ch) {
      c.channels[ch.label] = ch;
      ch.onopen = () => this.checkOpen(c);
      ch.onclose = () => this.drop(c, false);
      ch.onmessage = (e) => this.receive(c, ch.label, e.data);
      if (ch.readyState === "open") this.checkOpen(c);
    }

    checkOpen(c) {
      const r = c.channels.reliable;
      const u = c.channels.unreliable;
      if (c.closed || c.state === "connected" || !r || !u || r.readyState !== "open" || u.readyState !== "open") {
        return;
      }
      c.state = "connected";
      clearTimeout(c.timer);
      if (c.initiator) op({ name: "connect", ms: performance.now() - c.t0, ok: true });
      refresh();
    }

    drop(c, leave) {
      if (c.closed) return;
      c.closed = true;
      clearTimeout(c.timer);
      if (this.conns.get(c.peer) === c) this.conns.delete(c.peer);
      for (const ch of Object.values(c.channels)) {
        ch.onclose = null;
        ch.onmessage = null;
        try {
          ch.close();
        } catch (e) {
          /* already closed */
        }
      }
      c.pc.onconnectionstatechange = null;
      try {
        c.pc.close();
      } catch (e) {
        /* already closed */
      }
      if (leave) this.signal("LEAVE", c.peer, { sessionId: c.sessionId });
      refresh();
      if (!this.stopped) setTimeout(() => this.topUp(), 250);
    }

    async offer(remote) {
      const c = this.newConn(remote, uuid4(), true);
      try {
        this.wire(c, c.pc.createDataChannel("reliable", { ordered: true }));
        this.wire(c, c.pc.createDataChannel("unreliable", { ordered: false, maxRetransmits: 0 }));
        await c.pc.setLocalDescription(await c.pc.createOffer());
        await gathered(c.pc, 3000);
        if (c.closed) return;
        const sdp = localSdp(c.pc.localDescription.sdp);
        if (!hasCandidate(sdp)) throw new Error("no 127.0.0.1 ICE candidate to offer");
        this.signal("OFFER", remote, { sdp, type: "offer", sessionId: c.sessionId });
      } catch (e) {
        this.backoff.set(remote, Date.now() + BACKOFF_MS);
        this.drop(c, false);
        throw e;
      }
    }

    async onOffer(src, payload) {
      if (this.stopped || this.state !== "running") return;
      const existing = this.conns.get(src);
      if (existing) {
        // cross offers: the smaller id keeps its own offer and ignores the other's
        if (existing.initiator && existing.state === "connecting" && this.id < src) return;
        this.drop(existing, false);
      }
      if (this.conns.size >= this.maxConns) {
        this.signal("REJECT", src, { reason: "TOO_MANY_CONNECTIONS", sessionId: payload.sessionId });
        return;
      }
      const c = this.newConn(src, payload.sessionId, false);
      try {
        await c.pc.setRemoteDescription({ type: "offer", sdp: filterSdp(payload.sdp) });
        await c.pc.setLocalDescription(await c.pc.createAnswer());
        await gathered(c.pc, 3000);
        if (c.closed) return;
        const sdp = localSdp(c.pc.localDescription.sdp);
        if (!hasCandidate(sdp)) throw new Error("no 127.0.0.1 ICE candidate to answer with");
        this.signal("ANSWER", src, { sdp, type: "answer", sessionId: c.sessionId });
      } catch (e) {
        this.drop(c, false);
        throw e;
      }
    }

    async onAnswer(src, payload) {
      const c = this.conns.get(src);
      if (!c || !c.initiator || c.closed || c.sessionId !== payload.sessionId) return;
      if (c.pc.signalingState !== "have-local-offer") return;
      try {
        await c.pc.setRemoteDescription({ type: "answer", sdp: filterSdp(payload.sdp) });
      } catch (e) {
        this.drop(c, true);
        throw e;
      }
    }

    // -- packets ----------------------------------------------------------------------------------
    packet(type, body) {
      this.seq += 1;
      return {
        seq: this.seq,
        inst: this.inst,
        ts: Date.now(),
        src: this.id,
        sub: type.name,
        dot: type.dot,
        exp: type.exp,
        hops: 0,
        ttl: type.ttl,
        rb: [],
        opt: type.opt,
        ...body,
      };
    }

    sendMessage(room, data, type) {
      this.sendPacket(this.packet(type, { msg: { room, dst: [], data } }), type.channel);
    }

    sendPacket(p, label, only) {
      if (!p.rb.includes(this.id)) p.rb.push(this.id);
      const targets = only ? [only] : this.connected().filter((c) => !p.rb.includes(c.peer));
      if (!targets.length) return;
      if (p.opt) for (const c of targets) if (!p.rb.includes(c.peer)) p.rb.push(c.peer);
      const text = JSON.stringify(p);
      const bytes = utf8Length(text);
      const family = p.hops === 0 ? "sent" : "relayed";
      for (const c of targets) {
        const ch = c.channels[label];
        if (!ch || ch.readyState !== "open") continue;
        try {
          ch.send(text);
        } catch (e) {
          continue;
        }
        this.stats.count(family, bytes);
        this.stats.count("all", bytes);
      }
    }

    receive(c, label, data) {
      if (typeof data !== "string") return;
      const bytes = utf8Length(data);
      const now = Date.now();
      this.stats.count("received", bytes);
      this.stats.count("all", bytes);
      let p;
      try {
        p = JSON.parse(data);
      } catch (e) {
        fail("receive", "a packet that is not JSON");
        return;
      }
      const key = `${p.src}_${p.inst}_${p.seq}`;
      const duplicate = this.receivedPackets.has(key);
      if (duplicate) this.stats.count("duplicate", bytes);
      const expire = p.exp > 0 ? p.exp : DEFAULT_EXPIRE_MS;
      this.receivedPackets.set(key, { t: now, exp: expire });
      const k = this.known.get(p.src);
      const expired =
        !!k &&
        ((p.dot >= 0 &&
          k.tsByType[p.sub] !== undefined &&
          k.tsByType[p.sub] - p.ts > p.dot &&
          k.seqByType[p.sub] >= p.seq) ||
          (k.timestamp !== undefined && k.timestamp - p.ts > expire));
      if (expired) this.stats.count("expired", bytes);
      const relevant = !p.msg || this.rooms.has(p.msg.room);
      if (relevant) this.stats.count("relevant", bytes);
      if (duplicate || expired) return;
      if (k) {
        k.timestamp = k.timestamp === undefined ? p.ts : Math.max(k.timestamp, p.ts);
        const t = k.tsByType[p.sub];
        k.tsByType[p.sub] = t === undefined ? p.ts : Math.max(t, p.ts);
        const s = k.seqByType[p.sub];
        k.seqByType[p.sub] = s === undefined ? p.seq : Math.max(s, p.seq);
      }
      if (p.ping) {
        this.sendPacket(this.packet(PONG, { pong: { id: p.ping.id } }), "reliable", c);
      } else if (p.pong) {
        const pingKey = `${p.src}|${p.pong.id}`;
        const sent = this.pings.get(pingKey);
        if (sent !== undefined) {
          this.pings.delete(pingKey);
          this.latencies.set(p.src, now - sent);
        }
      }
      if (p.msg && relevant) {
        const sub = p.sub;
        if (this.deliveryCount < MAX_DELIVERIES) {
          (this.deliveries[sub] || (this.deliveries[sub] = [])).push(now - p.ts);
          this.deliveryCount += 1;
        }
        if (p.src in this.receivedFrom) this.receivedFrom[p.src] += 1;
        else if (this.receivedFromCount < MAX_RECEIVED_FROM) {
          this.receivedFrom[p.src] = 1;
          this.receivedFromCount += 1;
        }
        const pd = p.msg.data && p.msg.data.positionData;
        if (pd && k) k.position = [pd.positionX, pd.positionY, pd.positionZ];
      }
      p.hops += 1;
      if (p.hops < p.ttl) this.sendPacket(p, label);
    }

    ping() {
      const now = Date.now();
      for (const [key, t] of this.pings) if (now - t > 60000) this.pings.delete(key);
      for (const c of this.connected()) {
        this.pingId += 1;
        this.pings.set(`${c.peer}|${this.pingId}`, now);
        this.sendPacket(this.packet(PING, { ping: { id: this.pingId } }), "reliable", c);
      }
    }

    purge() {
      const now = Date.now();
      for (const [key, v] of this.receivedPackets) if (now - v.t > v.exp) this.receivedPackets.delete(key);
    }

    // -- stats ------------------------------------------------------------------------------------
    averageLatency() {
      const values = [];
      for (const [id, rtt] of this.latencies) if (this.known.has(id)) values.push(rtt);
      return values.length ? values.reduce((a, b) => a + b, 0) / values.length : undefined;
    }

    async webrtcStats() {
      const out = { rttMs: null, bytesSent: 0, bytesReceived: 0, packetsSent: 0, packetsReceived: 0 };
      const rtts = [];
      for (const c of this.connected()) {
        let report;
        try {
          report = await c.pc.getStats();
        } catch (e) {
          continue;
        }
        let pairId = null;
        report.forEach((s) => {
          if (s.type === "transport") {
            out.bytesSent += s.bytesSent || 0;
            out.bytesReceived += s.bytesReceived || 0;
            out.packetsSent += s.packetsSent || 0;
            out.packetsReceived += s.packetsReceived || 0;
            if (s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
          }
        });
        report.forEach((s) => {
          if (s.type !== "candidate-pair") return;
          const selected = pairId ? s.id === pairId : s.nominated && s.state === "succeeded";
          if (selected && typeof s.currentRoundTripTime === "number") rtts.push(s.currentRoundTripTime * 1000);
        });
      }
      if (rtts.length) out.rttMs = rtts.reduce((a, b) => a + b, 0) / rtts.length;
      return out;
    }

    /** Build this period's data point (the original's fields plus the harness extensions). */
    async dataPoint() {
      const webrtc = await this.webrtcStats();
      const point = this.stats.snapshot();
      point.connectedPeers = this.connected().map((c) => c.peer);
      point.knownPeersCount = this.known.size;
      point.position = this.position.slice();
      const latency = this.averageLatency();
      if (latency !== undefined) point.averageLatency = latency;
      point.kind = "browser";
      point.routine = this.routineName;
      point.receivedFrom = Object.assign({}, this.receivedFrom);
      point.webrtc = webrtc;
      point.deliveries = this.deliveries;
      this.deliveries = {};
      this.deliveryCount = 0;
      return point;
    }

    async submit(force) {
      if (!cfg.testId || (this.submitting && !force)) return;
      this.submitting = true;
      try {
        const point = await this.dataPoint();
        const url = `${cfg.statsServerUrl}/test/${encodeURIComponent(cfg.testId)}/peer/${encodeURIComponent(this.id)}/metrics`;
        const r = await fetch(url, { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(point) });
        if (!r.ok) {
          const j = await r.json().catch(() => null);
          fail("stats submit", `PUT metrics: ${r.status} ${(j && j.status) || ""}`.trim());
        }
      } catch (e) {
        fail("stats submit", `PUT metrics: ${oneLine(e)}`);
      } finally {
        this.submitting = false;
      }
    }

    tick(elapsed, delta) {
      if (this.state !== "running" || this.stopped) return;
      try {
        this.routine(elapsed, delta, this);
      } catch (e) {
        op({ counter: "webrtc_routine_errors", value: 1 });
        if (!this.routineFailed) fail("routine", e);
        this.routineFailed = true;
      }
    }

    /** Final stats, LEAVE to every connection, close everything. */
    async stop() {
      if (this.stopped) return;
      if (this.state === "running") await this.submit(true);
      this.stopped = true;
      for (const t of this.timers) clearInterval(t);
      this.timers = [];
      for (const c of Array.from(this.conns.values())) this.drop(c, true);
      if (this.ws) {
        try {
          this.ws.close();
        } catch (e) {
          /* already closed */
        }
      }
      this.state = "stopped";
    }
  }

  // ---- the page -----------------------------------------------------------------------------------
  const peers = [];
  for (let i = 0; i < cfg.numberOfPeers; i++) {
    const routines = cfg.routines.length ? cfg.routines : ["catalyst"];
    peers.push(new Peer(cfg.peerIds[i] || randomPeerId(), routines[Math.min(i, routines.length - 1)]));
  }

  function refresh() {
    let connected = 0;
    const counts = {};
    for (const name of FAMILIES) counts[name] = 0;
    status.peers = peers.map((p) => {
      const n = p.connected().length;
      connected += n;
      const totals = p.stats.totals();
      for (const name of FAMILIES) counts[name] += totals[name];
      return { id: p.id, state: p.state, routine: p.routineName, connected: n, known: p.known.size, joinMs: p.joinMs };
    });
    status.connected = connected;
    status.counts = counts;
    const el = document.getElementById("status");
    if (el) el.textContent = JSON.stringify(status, null, 1);
  }
  setInterval(refresh, 1000);

  let finishing = null;
  function finish(state, message) {
    if (!finishing) {
      finishing = Promise.all(peers.map((p) => p.stop().catch(() => undefined))).then(() => {
        status.state = state;
        refresh();
        console.log(message);
        return status;
      });
    }
    return finishing;
  }
  function abort(error, record) {
    status.error = oneLine(error);
    status.state = "aborted";
    if (record !== false) fail("page", error);
    return finish("aborted", "Test aborted");
  }
  window.harnessStop = () => finish("stopped", "Test finished");

  let elapsed = 0;
  let lastTick = 0;
  function tick() {
    if (finishing) return;
    const now = performance.now();
    const delta = now - lastTick;
    lastTick = now;
    elapsed += delta;
    if (elapsed > cfg.testDurationMs) {
      finish("finished", "Test finished");
      return;
    }
    for (const p of peers) p.tick(elapsed, delta);
    setTimeout(tick, cfg.tickMs);
  }

  async function waitForStart() {
    if (!cfg.testId) return true;
    const deadline = Date.now() + START_GIVE_UP_MS;
    const url = `${cfg.statsServerUrl}/test/${encodeURIComponent(cfg.testId)}`;
    while (Date.now() < deadline && !finishing) {
      try {
        const r = await fetch(url);
        if (r.ok) {
          const j = await r.json();
          if (j && j.started) return true;
        }
      } catch (e) {
        /* the stats server is not up yet: keep polling */
      }
      await sleep(START_POLL_MS);
    }
    return false;
  }

  async function main() {
    status.state = "waiting";
    refresh();
    if (!(await waitForStart())) {
      if (!finishing) abort(`test ${cfg.testId} did not start within ${START_GIVE_UP_MS / 1000} s`);
      return;
    }
    if (finishing) return;
    status.state = "joining";
    const t0 = performance.now();
    try {
      await Promise.all(peers.map((p) => p.start()));
    } catch (e) {
      fail("join room", e, performance.now() - t0);
      abort(e, false);
      return;
    }
    status.joinMs = performance.now() - t0;
    if (finishing) return;
    status.state = "running";
    refresh();
    setTimeout(() => {
      lastTick = performance.now();
      tick();
    }, Math.random() * cfg.startJitterMs);
  }
  main().catch((e) => {
    if (!finishing) abort(e);
  });
})();
