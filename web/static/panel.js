/* harness control panel: start runs, watch them live over Socket.IO, change the load, browse and
   compare past runs. Vanilla JS, no build step; the only libraries are the vendored uPlot and
   Socket.IO client. Every string from the server goes into the page as text (textContent,
   option.text, canvas fillText), never as HTML. */
(function () {
  "use strict";

  var MAX_POINTS = 900;            // live chart points kept in the browser (15 minutes at 1/s)
  var POLL_MS = 5000;              // events, errors and data points of a live run
  var CPU_WARN = 80;               // harness health warnings, as in the run summary
  var LAG_WARN_MS = 50;
  var FINAL = { passed: 1, failed: 1, aborted: 1, error: 1, finished: 1, completed: 1 };
  var PALETTE = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#0891b2", "#db2777", "#65a30d",
                 "#ea580c", "#4f46e5", "#0d9488", "#be123c", "#854d0e"];
  var LATENCY = { p50: "#2563eb", p95: "#d97706", p99: "#dc2626" };
  var EVENT_COLORS = {
    run_started: "#16a34a", stopping: "#7c3aed", run_stopped: "#6b7280", worker_exited: "#ea580c",
    worker_restarted: "#d97706", worker_unresponsive: "#dc2626", worker_given_up: "#dc2626",
    threshold_aborted: "#dc2626", degradation: "#dc2626", scaled_manually: "#0891b2",
    group_finished: "#6b7280", target_restarted: "#d97706", recovered_aborted: "#dc2626",
    stop_requested: "#7c3aed", operator_action: "#0f766e", baseline_marked: "#d97706",
    agent_joined: "#0f766e", agent_disconnected: "#d97706", agent_reconnected: "#16a34a", agent_lost: "#dc2626",
    agent_idle: "#6b7280"
  };
  var EVENT_LABELS = {
    run_started: "start", stopping: "stopping", run_stopped: "stopped", worker_exited: "worker exited",
    worker_restarted: "worker restarted", worker_unresponsive: "worker unresponsive",
    worker_given_up: "worker given up", threshold_aborted: "threshold abort", degradation: "degradation",
    scaled_manually: "scaled by hand", group_finished: "group finished", target_restarted: "target restarted",
    stop_requested: "stop requested", operator_action: "operator action", baseline_marked: "marked baseline",
    agent_joined: "agent joined", agent_disconnected: "agent disconnected", agent_reconnected: "agent reconnected",
    agent_lost: "agent lost", agent_idle: "agent idle"
  };
  var CLOCK_WARN_S = 0.5;          // an agent's clock offset beyond this distorts the timeline

  var S = {
    csrf: null,
    authRequired: false,
    profiles: [],
    loadedYaml: null,       // the text of the built-in profile as loaded (unchanged → send its name)
    socket: null,
    live: null,             // the run shown in the Live tab (see newLive)
    detail: null,           // the run open in the History tab
    runs: [],
    view: "start"
  };

  // -- small helpers -----------------------------------------------------------------------------
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function setText(node, text) {
    text = text == null ? "" : String(text);
    if (node.textContent !== text) node.textContent = text;
  }
  function enc(s) { return encodeURIComponent(s); }
  function asList(d, key) {
    if (Array.isArray(d)) return d;
    if (d && Array.isArray(d[key])) return d[key];
    return [];
  }

  function fmtT(s) {
    if (s == null || isNaN(s)) return "–";
    var neg = s < 0; s = Math.abs(s);
    var out;
    if (s < 60) out = (Math.round(s * 10) / 10) + "s";
    else if (s < 3600) {
      var m = Math.floor(s / 60), r = Math.round(s - m * 60);
      if (r === 60) { m += 1; r = 0; }
      out = m + "m" + (r ? (r < 10 ? "0" : "") + r + "s" : "");
    } else {
      var h = Math.floor(s / 3600), mm = Math.round((s - h * 3600) / 60);
      out = h + "h" + (mm ? (mm < 10 ? "0" : "") + mm + "m" : "");
    }
    return (neg ? "-" : "") + out;
  }
  function fmtClock(s) {
    if (s == null || isNaN(s)) return "–";
    s = Math.max(0, Math.floor(s));
    var m = Math.floor(s / 60), r = s % 60;
    return m + ":" + (r < 10 ? "0" : "") + r;
  }
  function fmtNum(v) {
    if (v == null || isNaN(v)) return "–";
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a === 0) return "0";
    return v.toFixed(a >= 1 ? 2 : 3);
  }
  function fmtInt(v) { return v == null || isNaN(v) ? "–" : Math.round(v).toLocaleString("en-US"); }
  function fmtMs(v) { return v == null || isNaN(v) ? "–" : fmtNum(v); }
  function fmtPct(r) { return r == null || isNaN(r) ? "–" : (r * 100).toFixed(r * 100 >= 10 ? 1 : 2) + "%"; }
  function fmtTick(v) {
    if (v == null) return "";
    var a = Math.abs(v);
    if (a >= 1e6) return +(v / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return +(v / 1e3).toFixed(1) + "k";
    return String(+v.toFixed(3));
  }
  function epoch(v) {
    if (v == null) return null;
    if (typeof v === "number") return v;
    var t = Date.parse(v);
    return isNaN(t) ? null : t / 1000;
  }
  function fmtDate(v) {
    var t = epoch(v);
    if (t == null) return "–";
    var d = new Date(t * 1000);
    var p = function (n) { return (n < 10 ? "0" : "") + n; };
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " + p(d.getHours()) + ":" + p(d.getMinutes());
  }
  function color(i) { return PALETTE[i % PALETTE.length]; }
  function fade(hex, alpha) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }
  function statusBadge(node, status) {
    status = status || "idle";
    node.className = "badge status-" + String(status).replace(/[^a-z_-]/gi, "");
    node.dataset.status = status;
    setText(node, status);
  }

  var toastTimer = null;
  function toast(msg, isError) {
    var t = $("toast");
    t.className = "toast" + (isError ? " err" : "");
    t.textContent = msg;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { t.hidden = true; }, isError ? 7000 : 3500);
  }

  // -- API ---------------------------------------------------------------------------------------
  /* Resolves with {ok, status, data}; a 401 opens the login prompt. Never rejects. */
  function api(method, path, body) {
    var opts = { method: method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") {
      opts.headers["Content-Type"] = "application/json";
      if (S.csrf) opts.headers["X-CSRF-Token"] = S.csrf;
      opts.body = JSON.stringify(body || {});
    }
    return fetch(path, opts).then(function (r) {
      return r.text().then(function (txt) {
        var data = null;
        try { data = txt ? JSON.parse(txt) : null; } catch (e) { data = { error: txt.slice(0, 300) }; }
        if (r.status === 401) showLogin();
        return { ok: r.ok, status: r.status, data: data };
      });
    }, function (err) {
      return { ok: false, status: 0, data: { error: "cannot reach the panel: " + err.message } };
    });
  }
  function errorText(res) {
    var d = res.data || {};
    var msg = d.error || d.message || ("HTTP " + res.status);
    return d.field ? d.field + ": " + msg : msg;
  }

  // -- session and login -------------------------------------------------------------------------
  function loadSession() {
    return api("GET", "api/session").then(function (res) {
      var d = res.data || {};
      if (d.csrf_token) S.csrf = d.csrf_token;
      S.authRequired = !!d.auth_required;
      if (d.auth_required && !d.authenticated) { showLogin(); return false; }
      return res.ok;
    });
  }
  function showLogin() {
    if (!$("login").hidden) return;
    $("login").hidden = false;
    $("login-token").focus();
  }
  $("login-form").addEventListener("submit", function (e) {
    e.preventDefault();
    var msg = $("login-msg");
    msg.hidden = true;
    api("POST", "api/login", { token: $("login-token").value }).then(function (res) {
      if (!res.ok) { msg.textContent = errorText(res); msg.hidden = false; return; }
      $("login-token").value = "";
      $("login").hidden = true;
      boot();
    });
  });

  // -- tabs and routing --------------------------------------------------------------------------
  function show(view, push) {
    S.view = view;
    ["start", "live", "history"].forEach(function (v) {
      $("view-" + v).hidden = v !== view;
      $("tab-" + v).setAttribute("aria-selected", v === view ? "true" : "false");
    });
    if (push !== false) {
      var hash = "#" + view;
      if (view === "live" && S.live) hash += "/" + S.live.id;
      if (view === "history" && S.detail) hash += "/" + S.detail.id;
      if (location.hash !== hash) history.replaceState(null, "", hash);
    }
    if (view === "live" && S.live) { ensureLiveCharts(); redrawLive(); resizeCharts(PEERS.live.charts); }
    if (view === "history") { loadHistory(); if (S.detail) resizeCharts(S.detail.charts); resizeCharts(PEERS.detail.charts); }
  }
  ["start", "live", "history"].forEach(function (v) {
    $("tab-" + v).addEventListener("click", function () { show(v); });
  });

  // -- charts (shared by Live and History) -------------------------------------------------------
  function isMajor(ev) {
    if (ev.type === "scaled" || ev.type === "worker_started" || ev.type === "group_started") return false;
    if (ev.type === "worker_exited" && ev.detail && ev.detail.exit_code === 0) return false;
    return true;
  }
  /* A marker's label: operator actions say what was done ("start by panel 127.0.0.1"). */
  function eventName(ev) {
    var d = ev.detail || {};
    if (ev.type === "operator_action") return (d.action || "operator action") + (d.who ? " by " + d.who : "");
    return EVENT_LABELS[ev.type] || ev.type.replace(/_/g, " ");
  }
  function describe(ev) {
    var parts = [];
    var d = ev.detail || {};
    Object.keys(d).forEach(function (k) {
      var v = d[k];
      if (v !== null && typeof v === "object") v = JSON.stringify(v);
      else if (typeof v === "number") v = Math.round(v * 1000) / 1000;
      parts.push(k + "=" + v);
    });
    return fmtT(ev.x) + "  " + ev.type + (ev.group ? " [" + ev.group + "]" : "") +
      (parts.length ? "\n   " + parts.join(", ") : "");
  }

  /* Lifecycle events and operator actions on the time axis: major ones as dashed lines with a label,
     minor ones (scaling steps, worker starts) as short ticks; a tooltip lists those under the cursor.
     `ctx.events()` returns [{x, type, group, detail}] with x in the chart's time unit. */
  function eventsPlugin(ctx) {
    var tip;
    function clusters(u, major) {
      var out = [];
      major.forEach(function (ev) {
        var x = Math.round(u.valToPos(ev.x, "x", true)) + 0.5;
        var last = out[out.length - 1];
        if (last && Math.abs(x - last.x) <= 6 * uPlot.pxRatio) last.events.push(ev);
        else out.push({ x: x, events: [ev] });
      });
      out.forEach(function (cl) {
        var parts = [], byName = {};
        cl.events.forEach(function (ev) {
          var name = eventName(ev);
          if (!(name in byName)) { byName[name] = []; parts.push(name); }
          if (ev.group && byName[name].indexOf(ev.group) < 0) byName[name].push(ev.group);
        });
        cl.label = parts.map(function (name) {
          return byName[name].length ? name + " (" + byName[name].join(", ") + ")" : name;
        }).join(" · ");
      });
      return out;
    }
    function draw(u) {
      var events = ctx.events();
      if (!events.length) return;
      var c = u.ctx, b = u.bbox, px = uPlot.pxRatio;
      var major = events.filter(isMajor), minor = events.filter(function (e) { return !isMajor(e); });
      c.save();
      c.beginPath(); c.rect(b.left, b.top - 1, b.width, b.height + 2); c.clip();
      minor.forEach(function (ev) {
        var x = Math.round(u.valToPos(ev.x, "x", true)) + 0.5;
        c.strokeStyle = fade(ev.group ? ctx.groupColor(ev.group) : "#6b7280", 0.65);
        c.lineWidth = 2 * px; c.setLineDash([]);
        c.beginPath(); c.moveTo(x, b.top + b.height); c.lineTo(x, b.top + b.height - 7 * px); c.stroke();
      });
      var rows = [];
      c.font = (11 * px) + "px " + getComputedStyle(document.body).fontFamily;
      c.textBaseline = "top"; c.textAlign = "left";
      clusters(u, major).forEach(function (cl) {
        var x = cl.x;
        if (x < b.left - 1 || x > b.left + b.width + 1) return;
        cl.events.forEach(function (ev) {
          var ex = Math.round(u.valToPos(ev.x, "x", true)) + 0.5;
          c.strokeStyle = EVENT_COLORS[ev.type] || "#475569";
          c.lineWidth = 1.25 * px; c.setLineDash([5 * px, 4 * px]);
          c.beginPath(); c.moveTo(ex, b.top); c.lineTo(ex, b.top + b.height); c.stroke();
        });
        var col = EVENT_COLORS[cl.events[cl.events.length - 1].type] || "#475569";
        var w = c.measureText(cl.label).width + 8 * px, h = 15 * px;
        var lx = x + 3 * px;
        if (lx + w > b.left + b.width) lx = Math.max(b.left, x - 3 * px - w);
        for (var row = 0; row < 4; row++) {
          var busy = rows[row] || [];
          var free = busy.every(function (r) { return lx + w < r[0] - 2 * px || lx > r[1] + 2 * px; });
          if (!free) continue;
          busy.push([lx, lx + w]); rows[row] = busy;
          var ly = b.top + 3 * px + row * (h + 2 * px);
          c.setLineDash([]);
          c.fillStyle = "rgba(255,255,255,0.9)"; c.fillRect(lx, ly, w, h);
          c.strokeStyle = fade(col, 0.55); c.lineWidth = 1 * px; c.strokeRect(lx, ly, w, h);
          c.fillStyle = col; c.fillText(cl.label, lx + 4 * px, ly + 2 * px);
          break;
        }
      });
      c.restore();
    }
    function cursor(u) {
      if (!tip) return;
      var l = u.cursor.left;
      if (l == null || l < 0) { tip.hidden = true; return; }
      var near = ctx.events().filter(function (ev) { return Math.abs(u.valToPos(ev.x, "x") - l) <= 4; });
      if (!near.length) { tip.hidden = true; return; }
      tip.textContent = near.slice(0, 8).map(describe).join("\n") + (near.length > 8 ? "\n…" : "");
      tip.hidden = false;
      var left = l + 12;
      if (left + 300 > u.over.clientWidth) left = Math.max(0, l - 312);
      tip.style.left = left + "px"; tip.style.top = "8px";
    }
    return {
      hooks: {
        init: function (u) { tip = el("div", "evtip"); tip.hidden = true; u.over.appendChild(tip); },
        draw: draw,
        setCursor: cursor
      }
    };
  }

  function line(label, stroke, extra) {
    var s = { label: label, stroke: stroke, width: 1.75, spanGaps: false, value: function (u, v) { return fmtNum(v); } };
    for (var k in extra || {}) s[k] = extra[k];
    return s;
  }
  function zeroRange(u, min, max) { return [0, Math.max(1, (max || 0) * 1.08)]; }

  /* A chart card in `box`: {card, plot: null, sel?}. The plot is made by plot(). */
  function chartCard(box, key, title, sub) {
    var card = el("div", "chart-card");
    card.id = box.id + "-" + key;
    var head = el("header");
    var left = el("div");
    left.appendChild(el("h3", null, title));
    var subEl = el("div", "chart-sub", sub || "");
    left.appendChild(subEl);
    head.appendChild(left);
    var controls = el("div", "controls");
    head.appendChild(controls);
    card.appendChild(head);
    var area = el("div", "chart");
    card.appendChild(area);
    box.appendChild(card);
    return { card: card, area: area, controls: controls, sub: subEl, plot: null };
  }

  function plot(cc, series, data, ctx, opts) {
    if (cc.plot) { cc.plot.destroy(); cc.plot = null; }
    var font = "11px " + getComputedStyle(document.body).fontFamily;
    var options = {
      width: Math.max(260, cc.area.clientWidth || 560),
      height: (opts && opts.height) || 240,
      cursor: { sync: { key: ctx.sync.key }, drag: { x: true, y: false }, points: { size: 6 } },
      scales: { x: { time: false }, y: { range: zeroRange } },
      axes: [
        { stroke: "#6b7280", font: font, grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#e5e7eb", width: 1 },
          values: function (u, splits) { return splits.map(fmtT); } },
        { stroke: "#6b7280", font: font, size: 52, grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#e5e7eb", width: 1 },
          values: function (u, splits) { return splits.map(fmtTick); } }
      ],
      series: [{ label: "t", value: function (u, v) { return fmtT(v); } }].concat(series),
      legend: { live: true },
      plugins: [eventsPlugin(ctx)],
      hooks: { draw: [function () { cc.card.dataset.drawn = String((+cc.card.dataset.drawn || 0) + 1); }] }
    };
    if (opts && opts.range) options.scales.x.range = opts.range;
    cc.plot = new uPlot(options, data, cc.area);
    cc.seriesKey = series.map(function (s) { return s.label; }).join("\u0000");
    return cc.plot;
  }

  function resizeCharts(charts) {
    if (!charts) return;
    Object.keys(charts).forEach(function (k) {
      var cc = charts[k];
      if (!cc || !cc.plot) return;
      var w = Math.max(260, cc.area.clientWidth);
      if (cc.area.clientWidth && Math.abs(w - cc.plot.width) > 1) cc.plot.setSize({ width: w, height: cc.plot.height });
    });
  }
  if (window.ResizeObserver) {
    new ResizeObserver(function () {
      if (S.live) resizeCharts(S.live.charts);
      if (S.detail) resizeCharts(S.detail.charts);
      resizeCharts(PEERS.live.charts); resizeCharts(PEERS.detail.charts);
    }).observe(document.querySelector(".page"));
  }

  function select(cc, label, options, onChange) {
    var sel = document.createElement("select");
    sel.setAttribute("aria-label", label);
    fillSelect(sel, options);
    sel.addEventListener("change", function () { onChange(sel.value); });
    cc.controls.appendChild(sel);
    cc.sel = sel;
    return sel;
  }
  function fillSelect(sel, options) {
    var keep = sel.value;
    clear(sel);
    options.forEach(function (o) {
      if (o.group) {
        var og = document.createElement("optgroup");
        og.label = o.group;
        o.items.forEach(function (it) { og.appendChild(new Option(it.text, it.value)); });
        sel.appendChild(og);
      } else sel.appendChild(new Option(o.text, o.value));
    });
    if (keep && Array.prototype.some.call(sel.options, function (o) { return o.value === keep; })) sel.value = keep;
  }

  function eventLegend(box, events) {
    clear(box);
    var seen = {};
    events.filter(isMajor).forEach(function (ev) {
      if (seen[ev.type]) return;
      seen[ev.type] = true;
      var span = el("span");
      span.style.color = EVENT_COLORS[ev.type] || "#475569";
      span.appendChild(el("i"));
      span.appendChild(document.createTextNode(EVENT_LABELS[ev.type] || ev.type.replace(/_/g, " ")));
      box.appendChild(span);
    });
    if (events.some(function (e) { return !isMajor(e); })) {
      box.appendChild(el("span", null, "▮ ticks on the time axis: scaling steps and worker starts (hover for details)"));
    }
  }

  /* Sortable table heads: clicking sets table.sortKey/sortDesc and calls onSort. */
  function sortableHead(table, onSort) {
    var ths = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(ths, function (th) {
      th.tabIndex = 0;
      function go() {
        var numeric = th.dataset.sort === "num";
        var desc = th.getAttribute("aria-sort") === "ascending" || (!th.hasAttribute("aria-sort") && numeric);
        Array.prototype.forEach.call(ths, function (o) { o.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", desc ? "descending" : "ascending");
        table.sortKey = th.dataset.key; table.sortNum = numeric; table.sortDesc = desc;
        onSort();
      }
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
    });
  }
  function sortRows(table, rows) {
    if (!table.sortKey) return rows;
    var k = table.sortKey, num = table.sortNum, desc = table.sortDesc;
    return rows.slice().sort(function (a, b) {
      var r = num ? (a.v[k] || 0) - (b.v[k] || 0) : String(a.v[k]).localeCompare(String(b.v[k]));
      if (r === 0) r = (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
      return desc ? -r : r;
    });
  }

  // -- Start -------------------------------------------------------------------------------------
  function loadProfiles() {
    return api("GET", "api/profiles").then(function (res) {
      if (!res.ok) return;
      S.profiles = asList(res.data, "profiles");
      var sel = $("profile-select");
      clear(sel);
      sel.appendChild(new Option("— choose —", ""));
      S.profiles.forEach(function (p) { sel.appendChild(new Option(p.name, p.name)); });
      sel.appendChild(new Option("custom YAML", "__custom__"));
      var first = S.profiles.filter(function (p) { return p.name === "demo"; })[0] || S.profiles[0];
      if (first && !$("profile-yaml").value) { sel.value = first.name; loadProfile(first.name); }
    });
  }
  function loadProfile(name) {
    var p = S.profiles.filter(function (x) { return x.name === name; })[0];
    setText($("profile-description"), p ? p.description || "" : "");
    clearValidation();
    if (!p) { S.loadedYaml = null; return Promise.resolve(); }
    return api("GET", "api/profiles/" + enc(name)).then(function (res) {
      if (!res.ok) { toast(errorText(res), true); return; }
      $("profile-yaml").value = res.data.yaml || "";
      S.loadedYaml = $("profile-yaml").value;
    });
  }
  $("profile-select").addEventListener("change", function () {
    var v = this.value;
    if (v === "__custom__") { S.loadedYaml = null; setText($("profile-description"), "Your own profile: edit the YAML below."); $("profile-yaml").focus(); return; }
    loadProfile(v);
  });
  $("profile-file").addEventListener("change", function () {
    var f = this.files && this.files[0];
    if (!f) return;
    if (f.size > 1024 * 1024) { toast(f.name + " is larger than 1 MB", true); return; }
    var reader = new FileReader();
    reader.onload = function () {
      $("profile-yaml").value = String(reader.result);
      S.loadedYaml = null;
      $("profile-select").value = "__custom__";
      setText($("profile-description"), "Uploaded: " + f.name);
      clearValidation();
      validate();
    };
    reader.readAsText(f);
    this.value = "";
  });
  $("profile-yaml").addEventListener("input", function () { clearValidation(); });

  function overrides() {
    return $("overrides").value.split("\n").map(function (s) { return s.trim(); }).filter(function (s) { return s && s[0] !== "#"; });
  }
  function startBody() {
    var body = {};
    var yaml = $("profile-yaml").value;
    var name = $("profile-select").value;
    if (S.loadedYaml !== null && yaml === S.loadedYaml && name && name !== "__custom__") body.profile = name;
    else body.yaml = yaml;
    var ov = overrides();
    if (ov.length) body.overrides = ov;
    var d = $("duration").value.trim();
    if (d) body.duration = d;
    return body;
  }

  function clearValidation() {
    ["yaml", "duration", "overrides"].forEach(function (k) { $(k + "-msg").hidden = true; });
    ["profile-yaml", "duration", "overrides"].forEach(function (k) { $(k).classList.remove("invalid"); });
    $("validate-msg").hidden = true;
  }

  /* Where in the YAML text a dotted field path (groups.browse.users) is: a 1-based line or null. */
  function yamlLine(text, path) {
    if (!path) return null;
    var parts = String(path).split(".");
    var lines = text.split("\n");
    var i = 0, indent = -1, found = null;
    for (var p = 0; p < parts.length; p++) {
      var key = parts[p];
      if (/^\d+$/.test(key)) continue;   // list indices: keep looking for the next key below
      var hit = false;
      for (; i < lines.length; i++) {
        var m = /^(\s*)(?:-\s+)?["']?([^"':#]+?)["']?\s*:/.exec(lines[i]);
        if (!m) continue;
        var ind = m[1].length;
        if (found !== null && ind <= indent && lines[i].trim()) break;
        if (ind > indent && m[2].trim() === key) { hit = true; indent = ind; found = i; i++; break; }
      }
      if (!hit) break;
    }
    return found === null ? null : found + 1;
  }
  function selectLine(ta, n) {
    var lines = ta.value.split("\n");
    var start = 0;
    for (var i = 0; i < n - 1; i++) start += lines[i].length + 1;
    ta.focus();
    ta.setSelectionRange(start, start + (lines[n - 1] || "").length);
    var lh = parseFloat(getComputedStyle(ta).lineHeight) || 18;
    ta.scrollTop = Math.max(0, (n - 4) * lh);
  }

  /* Shows a validation error next to the field it names: duration, overrides, or the YAML (with its line). */
  function showFieldError(res) {
    var d = res.data || {};
    var field = d.field || "";
    var msg = d.error || d.message || ("HTTP " + res.status);
    // the message may repeat where it came from ("panel: groups.x.users: …"): say it once
    msg = String(msg).replace(/^panel:\s*/, "");
    if (field && msg.indexOf(field + ": ") === 0) msg = msg.slice(field.length + 2);
    var target = "yaml";
    var fromOverride = field && overrides().some(function (o) { return o.split("=")[0].trim() === field; });
    if (/^duration/.test(field) && $("duration").value.trim()) target = "duration";
    else if (/^overrides?/.test(field) || fromOverride || (!field && /--set|override/i.test(msg))) target = "overrides";
    var box = $(target + "-msg");
    clear(box);
    if (field) { box.appendChild(el("code", null, field)); box.appendChild(document.createTextNode(" ")); }
    var lineNo = target === "yaml" ? yamlLine($("profile-yaml").value, field) : null;
    box.appendChild(document.createTextNode(msg + (lineNo ? " (line " + lineNo + ")" : "")));
    box.hidden = false;
    $(target === "yaml" ? "profile-yaml" : target).classList.add("invalid");
    if (lineNo) selectLine($("profile-yaml"), lineNo);
    var v = $("validate-msg");
    v.className = "validation err";
    v.textContent = "✗ Not valid: " + (field || "the profile") +
      (target === "yaml" ? (lineNo ? " (YAML line " + lineNo + ")" : " (YAML)") : " (" + target + ")") + " — see below the field";
    v.hidden = false;
  }

  function validate() {
    clearValidation();
    var body = startBody();
    var req = { yaml: body.yaml, overrides: body.overrides };
    if (!req.yaml) req.yaml = $("profile-yaml").value;
    if (body.duration) req.overrides = (req.overrides || []).concat(["duration=" + body.duration]);
    return api("POST", "api/profiles/validate", req).then(function (res) {
      if (!res.ok) { showFieldError(res); return false; }
      var d = res.data || {};
      var groups = d.groups || [];
      var names = Array.isArray(groups) ? groups.map(function (g) { return typeof g === "string" ? g : g.name; }) : Object.keys(groups);
      var v = $("validate-msg");
      v.className = "validation ok";
      v.textContent = "✓ " + (d.name || "profile") + " is valid" + (names.length ? " — groups: " + names.join(", ") : "");
      v.hidden = false;
      return true;
    });
  }
  $("validate-btn").addEventListener("click", validate);

  $("start-btn").addEventListener("click", function () {
    var btn = this;
    clearValidation();
    btn.disabled = true;
    setText($("start-note"), "starting…");
    api("POST", "api/runs", startBody()).then(function (res) {
      btn.disabled = false;
      setText($("start-note"), "");
      if (res.status === 400) { showFieldError(res); return; }
      if (!res.ok) { toast(errorText(res), true); return; }
      openLive(res.data.run_id, "starting");
    });
  });

  // -- Live --------------------------------------------------------------------------------------
  function newLive(id) {
    return {
      id: id, status: "starting", profile: "", ticks: [], start: null, events: [], groups: [],
      groupRows: {}, statRows: {}, statOrder: [], charts: null, chartGroups: "", latency: "total",
      poll: null, sync: uPlot.sync("live-" + id), dirty: false, lastThresholds: "", dpKeys: ""
    };
  }

  function openLive(id, status) {
    if (S.live && S.live.id === id) { show("live"); return; }
    closeLive();
    var L = S.live = newLive(id);
    L.status = status || "running";
    setRunStatus(L.status);
    setText($("run-ref"), id);
    setText($("live-title"), id);
    setText($("live-sub"), "");
    $("live-empty").hidden = true;
    $("live-body").hidden = false;
    $("live-banner").hidden = true;
    $("stop-btn").disabled = false;
    $("live-report").hidden = true;
    clear($("groups-table").tBodies[0]);
    clear($("stats-table").tBodies[0]);
    clear($("failures-table").tBodies[0]);
    $("failures-empty").hidden = false;
    clear($("thresholds"));
    clear($("live-charts"));
    clear($("live-legend"));
    $("datapoints-section").hidden = true;
    peersReset(PEERS.live);
    ["card-users", "card-rps", "card-errors", "card-p95", "card-elapsed-value"].forEach(function (k) { setText($(k), "–"); });
    show("live");
    api("GET", "api/runs/" + enc(id)).then(function (res) {
      if (!res.ok || S.live !== L) return;
      var run = res.data.run || {};
      L.profile = run.profile || "";
      L.start = epoch(run.started_at) || L.start;
      setText($("live-sub"), "profile " + (run.profile || "?") + " · started " + fmtDate(run.started_at));
      if (run.status) { L.status = run.status; setRunStatus(run.status); }
      if (FINAL[run.status]) finishLive(run.status, run.reason || run.error);
    });
    joinLive();
    pollLive();
    L.poll = setInterval(pollLive, POLL_MS);
  }
  function closeLive() {
    if (!S.live) return;
    clearInterval(S.live.poll);
    if (S.live.charts) Object.keys(S.live.charts).forEach(function (k) { if (S.live.charts[k].plot) S.live.charts[k].plot.destroy(); });
    S.live = null;
  }
  function joinLive() {
    if (S.live && S.socket && S.socket.connected) S.socket.emit("join", { run_id: S.live.id });
  }
  function setRunStatus(status) { statusBadge($("run-status"), status); }

  function finishLive(status, reason) {
    var L = S.live;
    if (!L) return;
    L.status = status;
    setRunStatus(status);
    $("stop-btn").disabled = true;
    Object.keys(L.groupRows).forEach(function (g) {
      var r = L.groupRows[g];
      r.input.disabled = true; r.btn.disabled = true;
      setText(r.state, "ended"); r.state.className = "state state-done";
    });
    L.ended = true;
    if (reason) { $("live-banner").textContent = reason; $("live-banner").hidden = false; }
    var a = $("live-report");
    a.href = "api/runs/" + enc(L.id) + "/report/html?download=0";
    a.hidden = false;
    clearInterval(L.poll);
    setTimeout(pollLive, 1500);   // the final events, errors and data points
  }

  function connectSocket() {
    if (S.socket || typeof io !== "function") return;
    var conn = $("conn");
    function state(s, text) { conn.dataset.state = s; setText($("conn-text"), text); }
    state("wait", "connecting");
    var sock = S.socket = io({ withCredentials: true, reconnectionDelayMax: 5000 });
    sock.on("connect", function () { state("on", "live"); joinLive(); });
    sock.on("disconnect", function () { state("off", "offline"); });
    sock.on("connect_error", function (err) {
      state("off", "offline");
      if (err && /401|auth|token|unauthor/i.test(String(err.message || err))) loadSession();
    });
    sock.io.on("reconnect_attempt", function () { state("wait", "reconnecting"); });
    sock.on("joined", function (msg) {
      var L = S.live;
      if (!L || !msg || msg.run_id !== L.id) return;
      L.ticks = (msg.ticks || []).slice(-MAX_POINTS);
      if (L.ticks.length) onTick(L.ticks[L.ticks.length - 1], true);
      else redrawLive();
    });
    sock.on("tick", function (t) {
      var L = S.live;
      if (!L || !t || t.run_id !== L.id) return;
      var last = L.ticks[L.ticks.length - 1];
      if (last && last.t >= t.t) return;
      L.ticks.push(t);
      if (L.ticks.length > MAX_POINTS) L.ticks.splice(0, L.ticks.length - MAX_POINTS);
      onTick(t, false);
    });
    sock.on("run_status", function (msg) {
      if (!msg) return;
      var L = S.live;
      if (L && msg.run_id === L.id) {
        if (FINAL[msg.status]) finishLive(msg.status, msg.error);
        else { L.status = msg.status; setRunStatus(msg.status); }
      }
      if (S.view === "history") loadHistory();
    });
  }

  // -- agents (remote machines connected to this panel's hub) -----------------------------------
  function loadAgents() {
    api("GET", "api/agents").then(function (res) {
      if (!res.ok) return;
      var agents = asList(res.data, "agents");
      var limit = (res.data && res.data.clock_warning_s) || CLOCK_WARN_S;
      $("agents-section").hidden = !agents.length;
      var body = $("agents-table").tBodies[0];
      clear(body);
      var skewed = [];
      agents.forEach(function (a) {
        var cap = a.capacity || {};
        var off = Number(a.clock_offset_s || 0);
        if (Math.abs(off) > limit) skewed.push(a.name);
        var tr = el("tr");
        tr.appendChild(el("td", null, a.name));
        tr.appendChild(el("td", null, (a.labels || []).join(", ")));
        var health = el("td", "agent-health", a.health);
        health.setAttribute("data-health", a.health);
        tr.appendChild(health);
        tr.appendChild(el("td", "num", cap.cores != null ? cap.cores : "–"));
        tr.appendChild(el("td", "num", cap.processes != null ? cap.processes : "–"));
        tr.appendChild(el("td", "num", a.workers));
        var clock = el("td", "num", (off >= 0 ? "+" : "") + off.toFixed(3) + " s");
        if (Math.abs(off) > limit) clock.className = "num warn";
        tr.appendChild(clock);
        tr.appendChild(el("td", "num", a.outbox));
        tr.appendChild(el("td", "num" + (a.dropped ? " warn" : ""), a.dropped));
        tr.appendChild(el("td", "num", a.cpu_percent != null ? Math.round(a.cpu_percent) : "–"));
        tr.appendChild(el("td", null, a.run_id || (a.health === "disconnected" ? "" : "idle")));
        body.appendChild(tr);
      });
      var warn = $("agents-warn");
      warn.hidden = !skewed.length;
      setText(warn, skewed.length ? "Clock offset above " + limit + " s on " + skewed.join(", ") +
        ": timestamps are corrected by the measured offset, but a drifting clock distorts the timeline." : "");
    });
  }

  function pollLive() {
    loadAgents();
    var L = S.live;
    if (!L || !L.ticks.length) return;   // nothing is stored before the first tick
    var base = "api/runs/" + enc(L.id);
    // events come with each tick; read them from the database only to catch up (on join) and at the end
    if (!L.rawEvents || L.ended) api("GET", base + "/events").then(function (res) {
      if (!res.ok || S.live !== L) return;
      L.rawEvents = asList(res.data, "events");
      mapLiveEvents(L);
      eventLegend($("live-legend"), L.events);
      if (L.charts) Object.keys(L.charts).forEach(function (k) { if (L.charts[k].plot) L.charts[k].plot.redraw(false); });
    });
    api("GET", base + "/errors").then(function (res) {
      if (!res.ok || S.live !== L) return;
      fillErrors($("failures-table"), asList(res.data, "errors"), $("failures-empty"));
    });
    api("GET", base + "/datapoints").then(function (res) {
      if (!res.ok || S.live !== L) return;
      var rows = asList(res.data, "datapoints");
      // WebRTC peers (data points with sentTotal) have their own section; the rest stay in the table
      var others = rows.filter(function (r) { return !isPeerPoint(r); });
      if (others.length < rows.length || PEERS.live.runId === L.id) {
        peersLoad(PEERS.live, L.id, { sync: L.sync, events: function () { return L.events; } }, function () { return S.live === L; });
      }
      fillDatapoints(L, others);
    });
  }
  function mapLiveEvents(L) {
    L.events = (L.rawEvents || []).filter(function (e) { return typeof e.t === "number" || typeof e.offset_s === "number"; }).map(function (e) {
      var x = typeof e.offset_s === "number" ? e.offset_s : e.t - (L.start || e.t);
      return { x: x, type: e.type, group: e.group, detail: e.detail };
    });
  }

  /* Latency of the run, a group or one name at one tick: exact for a name; for a group or the whole
     run the tick's own percentiles when it has them, else the slowest name with traffic. */
  function tickLatency(t, src) {
    var eps = t.endpoints || [];
    if (src.indexOf("n:") === 0) {
      var key = src.slice(2);
      for (var i = 0; i < eps.length; i++) if (eps[i].group + "\u0000" + eps[i].name === key) return eps[i];
      return null;
    }
    var holder = src === "total" ? t.totals : (t.groups || {})[src.slice(2)];
    if (holder && holder.p95_ms != null) return holder;
    var g = src === "total" ? null : src.slice(2);
    var out = null;
    eps.forEach(function (e) {
      if (e.kind === "error" || (g && e.group !== g) || !e.rps) return;
      if (!out || (e.p95_ms || 0) > out.p95_ms) out = { p50_ms: e.p50_ms, p95_ms: e.p95_ms, p99_ms: e.p99_ms };
    });
    return out;
  }
  function exactLatency(t) { return t.totals && t.totals.p95_ms != null; }

  function groupNames(L) {
    var seen = {};
    L.ticks.forEach(function (t) { Object.keys(t.groups || {}).forEach(function (g) { seen[g] = 1; }); });
    return Object.keys(seen).sort();
  }
  function groupColorOf(L) {
    return function (name) { var i = L.groups.indexOf(name); return i < 0 ? "#9ca3af" : color(i); };
  }

  function ensureLiveCharts() {
    var L = S.live;
    if (!L || S.view !== "live" || $("live-body").hidden) return;
    var groups = groupNames(L);
    var key = groups.join("\u0000");
    if (L.charts && L.chartGroups === key) return;
    L.groups = groups;
    L.chartGroups = key;
    var box = $("live-charts");
    if (L.charts) Object.keys(L.charts).forEach(function (k) { if (L.charts[k].plot) L.charts[k].plot.destroy(); });
    clear(box);
    var ctx = { sync: L.sync, events: function () { return L.events; }, groupColor: groupColorOf(L) };
    var span = function (u, min, max) {
      var xs = u.data[0];
      var lo = xs.length ? xs[0] : 0, hi = xs.length ? xs[xs.length - 1] : 1;
      if (min == null || min < lo - 1 || (max != null && max > hi + 1)) { min = lo; max = hi; }
      return [min, Math.max(max, min + 10)];
    };
    L.charts = {
      users: chartCard(box, "users", "Users", "per group (busy users in open-model groups)"),
      rps: chartCard(box, "rps", "Throughput", "requests per second, per group"),
      latency: chartCard(box, "latency", "Latency", "p50 / p95 / p99, ms"),
      errors: chartCard(box, "errors", "Errors", "failures per second, per group")
    };
    var gs = function (extra) { return groups.map(function (g, i) { return line(g, color(i), extra ? extra(color(i)) : {}); }); };
    var empty = function (n) { var d = [[]]; for (var i = 0; i < n; i++) d.push([]); return d; };
    plot(L.charts.users, gs(function () { return { paths: uPlot.paths.stepped({ align: 1 }) }; }), empty(groups.length), ctx, { range: span });
    plot(L.charts.rps, gs().concat(groups.length > 1 ? [line("total", "#374151", { dash: [4, 3], width: 1.25 })] : []),
      empty(groups.length + (groups.length > 1 ? 1 : 0)), ctx, { range: span });
    plot(L.charts.latency, ["p50", "p95", "p99"].map(function (p) { return line(p, LATENCY[p], p === "p99" ? { fill: fade(LATENCY.p99, 0.06) } : {}); }),
      empty(3), ctx, { range: span });
    plot(L.charts.errors, gs(function (c) { return { fill: fade(c, 0.12) }; }), empty(groups.length), ctx, { range: span });
    select(L.charts.latency, "latency of", latencyOptions(L), function (v) { L.latency = v; redrawLive(); });
    L.charts.latency.sel.value = L.latency;
    L.latencyNames = null;
  }
  function latencyOptions(L) {
    var opts = [{ text: "whole run", value: "total" }];
    if (L.groups.length) opts.push({ group: "groups", items: L.groups.map(function (g) { return { text: g, value: "g:" + g }; }) });
    var last = L.ticks[L.ticks.length - 1];
    var names = ((last && last.endpoints) || []).filter(function (e) { return e.kind !== "error"; });
    if (names.length) opts.push({ group: "names", items: names.map(function (e) { return { text: e.group + " / " + e.name, value: "n:" + e.group + "\u0000" + e.name }; }) });
    return opts;
  }

  /* Rebuilds the chart data from the bounded tick buffer (≤ MAX_POINTS × a few series: cheap). */
  function redrawLive() {
    var L = S.live;
    if (!L || !L.charts || S.view !== "live" || document.hidden) { if (L) L.dirty = true; return; }
    L.dirty = false;
    var ticks = L.ticks, groups = L.groups;
    var X = ticks.map(function (t) { return t.elapsed; });
    var users = [X], rps = [X], errs = [X], lat = [X, [], [], []];
    groups.forEach(function (g) {
      users.push(ticks.map(function (t) { var v = (t.groups || {})[g]; return v ? v.users : null; }));
      rps.push(ticks.map(function (t) { var v = (t.groups || {})[g]; return v ? v.rps : null; }));
      errs.push(ticks.map(function (t) { var v = (t.groups || {})[g]; return v ? v.errors_per_s : null; }));
    });
    if (groups.length > 1) rps.push(ticks.map(function (t) { return t.totals ? t.totals.rps : null; }));
    ticks.forEach(function (t) {
      var l = tickLatency(t, L.latency);
      lat[1].push(l ? l.p50_ms : null); lat[2].push(l ? l.p95_ms : null); lat[3].push(l ? l.p99_ms : null);
    });
    L.charts.users.plot.setData(users);
    L.charts.rps.plot.setData(rps);
    L.charts.errors.plot.setData(errs);
    L.charts.latency.plot.setData(lat);
    var last = ticks[ticks.length - 1];
    var exact = !last || exactLatency(last) || L.latency.indexOf("n:") === 0;
    setText(L.charts.latency.sub, exact ? "p50 / p95 / p99, ms, over the last seconds" : "p50 / p95 / p99, ms — of the slowest name in the selection");
    if (L.charts.latency.sel && last) {
      // refill the selector only when the names change (rebuilding it would close an open list)
      var names = (last.endpoints || []).map(function (e) { return e.group + "\u0000" + e.name; }).join("\u0001");
      if (names !== L.latencyNames) { L.latencyNames = names; fillSelect(L.charts.latency.sel, latencyOptions(L)); }
    }
    $("live-charts").dataset.points = String(X.length);
  }
  document.addEventListener("visibilitychange", function () { if (!document.hidden && S.live && S.live.dirty) redrawLive(); });

  function onTick(t, bulk) {
    var L = S.live;
    if (L.start == null && t.t != null && t.elapsed != null) L.start = t.t - t.elapsed;
    if (t.events && t.events.length && !bulk) {
      // lifecycle events and operator actions arrive with the tick that stored them
      L.rawEvents = (L.rawEvents || []).concat(t.events);
      mapLiveEvents(L);
      eventLegend($("live-legend"), L.events);
    } else if (L.rawEvents) mapLiveEvents(L);
    if (L.status === "starting" || L.status === "idle") { L.status = "running"; setRunStatus("running"); }
    updateCards(t);
    updateGroups(L, t);
    updateStats(L, t);
    updateThresholds(L, t.thresholds || []);
    updateHealth(t.health || {});
    if (S.view === "live") {
      ensureLiveCharts();
      if (L.charts && groupNames(L).join("\u0000") !== L.chartGroups) { L.charts = null; ensureLiveCharts(); }
      redrawLive();
    } else L.dirty = true;
    if (bulk) pollLive();
  }

  function updateCards(t) {
    var tot = t.totals || {};
    var users = 0, rate = 0, open = 0;
    Object.keys(t.groups || {}).forEach(function (g) {
      var v = t.groups[g];
      users += v.users || 0;
      if (v.mode === "open") { open++; rate += v.target || 0; }
    });
    setText($("card-users"), fmtInt(users));
    setText($("card-users-sub"), open ? "+ " + fmtNum(rate) + "/s arrivals in " + open + " open group" + (open > 1 ? "s" : "") : Object.keys(t.groups || {}).length + " groups");
    setText($("card-rps"), fmtNum(tot.rps || 0));
    setText($("card-rps-sub"), fmtInt(tot.requests) + " requests");
    setText($("card-errors"), fmtPct(tot.error_rate || 0));
    setText($("card-errors-sub"), fmtInt(tot.failures) + " failures");
    $("card-errors-box").className = "card" + ((tot.error_rate || 0) > 0.01 ? " bad" : "");
    var l = tickLatency(t, "total");
    setText($("card-p95"), l ? fmtMs(l.p95_ms) + " ms" : "–");
    setText($("card-p95-sub"), exactLatency(t) ? "whole run, last seconds" : "slowest name, last seconds");
    var el_ = t.elapsed || 0, dur = t.duration;
    setText($("card-elapsed-value"), fmtClock(el_) + (dur ? " / " + fmtClock(dur) : ""));
    $("card-elapsed-bar").style.width = dur ? Math.min(100, el_ / dur * 100).toFixed(1) + "%" : "0";
    setText($("card-elapsed-sub"), dur ? fmtT(Math.max(0, dur - el_)) + " left" : "");
  }

  function updateGroups(L, t) {
    var body = $("groups-table").tBodies[0];
    var names = Object.keys(t.groups || {}).sort();
    names.forEach(function (g, i) {
      var v = t.groups[g];
      var r = L.groupRows[g];
      if (!r) r = L.groupRows[g] = groupRow(L, g, i);
      var open = v.mode === "open";
      setText(r.mode, open ? "open" : "closed");
      if (!L.ended) {
        setText(r.state, v.state || "");
        r.state.className = "state state-" + String(v.state || "").replace(/[^a-z]/g, "");
      }
      setText(r.users, fmtInt(v.users));
      setText(r.target, v.target == null ? "–" : open ? fmtNum(v.target) + "/s" : fmtInt(v.target));
      setText(r.rps, fmtNum(v.rps));
      setText(r.eps, fmtNum(v.errors_per_s));
      setText(r.req, fmtInt(v.requests));
      setText(r.fail, fmtInt(v.failures));
      r.fail.className = "num" + (v.failures ? " bad" : " zero");
      setText(r.unit, open ? "/s" : "users");
      r.input.step = open ? "0.1" : "1";
      r.input.placeholder = v.target == null ? "" : String(v.target);
      r.open = open;
      r.tr.dataset.users = String(v.users);
      if (!r.tr.parentNode) body.appendChild(r.tr);
    });
  }
  function groupRow(L, g, i) {
    var tr = el("tr");
    tr.dataset.group = g;
    var r = { tr: tr };
    var name = el("td");
    var sw = el("span", "swatch"); sw.style.background = color(L.groups.indexOf(g) >= 0 ? L.groups.indexOf(g) : i);
    name.appendChild(sw); name.appendChild(document.createTextNode(g));
    tr.appendChild(name);
    r.mode = tr.appendChild(el("td", "kind"));
    var st = el("td"); r.state = st.appendChild(el("span", "state")); tr.appendChild(st);
    r.users = tr.appendChild(el("td", "num")); r.users.id = "group-users-" + g;
    r.target = tr.appendChild(el("td", "num"));
    r.rps = tr.appendChild(el("td", "num"));
    r.eps = tr.appendChild(el("td", "num"));
    r.req = tr.appendChild(el("td", "num"));
    r.fail = tr.appendChild(el("td", "num"));
    var ctl = el("td");
    var wrap = el("div", "scale");
    var input = el("input"); input.type = "number"; input.min = "0"; input.id = "scale-" + g;
    input.setAttribute("aria-label", "new users or rate for " + g);
    var unit = el("span", "unit");
    var btn = el("button", "btn small", "Set"); btn.type = "button"; btn.id = "scale-btn-" + g;
    wrap.appendChild(input); wrap.appendChild(unit); wrap.appendChild(btn);
    ctl.appendChild(wrap); tr.appendChild(ctl);
    r.input = input; r.btn = btn; r.unit = unit;
    function go() { scaleGroup(L, g, r); }
    btn.addEventListener("click", go);
    input.addEventListener("keydown", function (e) { if (e.key === "Enter") go(); });
    return r;
  }
  function scaleGroup(L, g, r) {
    var v = parseFloat(r.input.value);
    if (isNaN(v) || v < 0) { r.input.classList.add("invalid"); toast("enter a number ≥ 0 for " + g, true); return; }
    r.input.classList.remove("invalid");
    r.btn.disabled = true;
    var body = r.open ? { rate: v } : { users: Math.round(v) };
    api("POST", "api/runs/" + enc(L.id) + "/groups/" + enc(g), body).then(function (res) {
      r.btn.disabled = FINAL[L.status] ? true : false;
      if (!res.ok) { toast(g + ": " + errorText(res), true); return; }
      toast(g + " → " + (r.open ? v + "/s" : Math.round(v) + " users"));
      r.input.value = "";
      setTimeout(pollLive, 600);
    });
  }

  $("stop-btn").addEventListener("click", function () {
    var L = S.live;
    if (!L) return;
    var btn = this;
    btn.disabled = true;
    api("POST", "api/runs/" + enc(L.id) + "/stop", {}).then(function (res) {
      if (!res.ok) { btn.disabled = false; toast(errorText(res), true); return; }
      if (!FINAL[L.status]) { L.status = "stopping"; setRunStatus("stopping"); }
      setTimeout(pollLive, 600);
    });
  });

  /* The statistics table: one row per (group, name), created once and updated in place. */
  function statRow(table, rowsMap, e) {
    var key = e.group + "\u0000" + e.name;
    var r = rowsMap[key];
    if (r) return r;
    var tr = el("tr");
    r = rowsMap[key] = { key: key, tr: tr, v: {}, c: {} };
    tr.appendChild(el("td", null, e.group));
    tr.appendChild(el("td", "name", e.name));
    tr.appendChild(el("td", "kind", e.kind || ""));
    ["rps", "p50_ms", "p95_ms", "p99_ms", "requests", "failures", "err"].forEach(function (k) {
      r.c[k] = tr.appendChild(el("td", "num"));
    });
    r.filterText = (e.group + " " + e.name).toLowerCase();
    return r;
  }
  function setStat(r, e) {
    var err = e.requests ? e.failures / e.requests : 0;
    r.v = { group: e.group, name: e.name, kind: e.kind || "", rps: e.rps || 0, p50_ms: e.p50_ms || 0, p95_ms: e.p95_ms || 0,
            p99_ms: e.p99_ms || 0, requests: e.requests || 0, failures: e.failures || 0, err: e.error_rate != null ? e.error_rate : err };
    setText(r.c.rps, fmtNum(r.v.rps));
    setText(r.c.p50_ms, fmtMs(e.p50_ms));
    setText(r.c.p95_ms, fmtMs(e.p95_ms));
    setText(r.c.p99_ms, fmtMs(e.p99_ms));
    setText(r.c.requests, fmtInt(r.v.requests));
    setText(r.c.failures, fmtInt(r.v.failures));
    setText(r.c.err, fmtPct(r.v.err));
    var cls = "num" + (r.v.failures ? " bad" : " zero");
    if (r.c.failures.className !== cls) { r.c.failures.className = cls; r.c.err.className = cls; }
  }
  function placeRows(table, body, rows, order) {
    var sorted = sortRows(table, rows);
    var keys = sorted.map(function (r) { return r.key; }).join("\u0001");
    if (keys === order.keys && body.rows.length === sorted.length) return;
    order.keys = keys;
    sorted.forEach(function (r) { body.appendChild(r.tr); });   // moves only; the rows are reused
  }
  var liveOrder = {};
  function updateStats(L, t) {
    var table = $("stats-table"), body = table.tBodies[0];
    var rows = [];
    (t.endpoints || []).forEach(function (e) {
      var r = statRow(table, L.statRows, e);
      setStat(r, e);
      rows.push(r);
    });
    L.statList = rows;
    placeRows(table, body, rows, liveOrder);
    applyFilter();
    var tot = t.totals || {};
    setText($("stats-total-rps"), fmtNum(tot.rps || 0));
    var l = tickLatency(t, "total");
    setText($("stats-total-p95"), l ? fmtMs(l.p95_ms) : "–");
    setText($("stats-total-req"), fmtInt(tot.requests));
    setText($("stats-total-fail"), fmtInt(tot.failures));
    setText($("stats-total-err"), fmtPct(tot.error_rate || 0));
  }
  function applyFilter() {
    var L = S.live;
    if (!L || !L.statList) return;
    var q = $("stats-filter").value.trim().toLowerCase();
    L.statList.forEach(function (r) {
      var hide = !!q && r.filterText.indexOf(q) < 0;
      if (r.tr.hidden !== hide) r.tr.hidden = hide;
    });
  }
  $("stats-filter").addEventListener("input", applyFilter);
  sortableHead($("stats-table"), function () {
    liveOrder.keys = null;
    if (S.live && S.live.statList) placeRows($("stats-table"), $("stats-table").tBodies[0], S.live.statList, liveOrder);
  });

  function fillThresholds(list, items) {
    clear(list);
    items.forEach(function (th) {
      var li = el("li", th.ok ? "ok" : "fail");
      li.appendChild(el("span", "verdict", th.ok ? "✓" : "✗"));
      li.appendChild(el("code", null, th.expr || th.threshold || ""));
      var v = th.value;
      li.appendChild(el("span", "value", v == null ? "–" : typeof v === "number" ? fmtNum(v) : String(v)));
      list.appendChild(li);
    });
  }
  function updateThresholds(L, items) {
    var key = JSON.stringify(items);
    if (key === L.lastThresholds) return;
    L.lastThresholds = key;
    fillThresholds($("thresholds"), items);
    $("thresholds-empty").hidden = items.length > 0;
  }

  function updateHealth(h) {
    var node = $("health");
    var cpu = h.cpu_max || 0, lag = h.loop_lag_max_ms || 0;
    var warn = [];
    if (cpu > CPU_WARN) warn.push("a worker is at " + cpu.toFixed(0) + "% CPU: the load generator may be the bottleneck");
    if (lag > LAG_WARN_MS) warn.push("event-loop lag " + lag.toFixed(0) + " ms: latencies include harness delay");
    var text = (warn.length ? "⚠ " : "") + (h.workers || 0) + " workers · cpu max " + cpu.toFixed(0) + "% · loop lag max " +
      lag.toFixed(1) + " ms · rss " + fmtNum(h.rss_mb || 0) + " MB · dropped " + fmtInt(h.dropped || 0) +
      (warn.length ? "  —  " + warn.join("; ") : "");
    setText(node, text);
    node.dataset.warn = warn.length ? "1" : "0";
  }

  function fillErrors(table, errors, emptyEl) {
    var body = table.tBodies[0];
    var key = JSON.stringify(errors);
    if (table.dataset.key === key) return;
    table.dataset.key = key;
    clear(body);
    errors.slice(0, 100).forEach(function (e) {
      var tr = el("tr");
      tr.appendChild(el("td", null, e.group || ""));
      tr.appendChild(el("td", "name", e.name || ""));
      tr.appendChild(el("td", "message", e.message || ""));
      tr.appendChild(el("td", "num", fmtInt(e.count)));
      body.appendChild(tr);
    });
    table.parentNode.hidden = !errors.length;
    if (emptyEl) emptyEl.hidden = errors.length > 0;
  }

  /* Data points are whatever simulators publish: the newest 200, one column per key seen. */
  function fillDatapoints(L, rows) {
    var section = $("datapoints-section");
    if (!rows.length) { section.hidden = true; return; }
    section.hidden = false;
    var flat = rows.slice(-200).reverse().map(function (r) {
      var o = {};
      Object.keys(r).forEach(function (k) {
        var v = r[k];
        if (v && typeof v === "object" && !Array.isArray(v)) Object.keys(v).forEach(function (kk) { o[kk] = v[kk]; });
        else o[k] = v;
      });
      return o;
    });
    var keys = [];
    flat.forEach(function (o) { Object.keys(o).forEach(function (k) { if (keys.indexOf(k) < 0 && k !== "run_id" && k !== "id") keys.push(k); }); });
    keys = keys.slice(0, 14);
    var table = $("datapoints-table");
    var headRow = table.tHead.rows[0];
    if (L.dpKeys !== keys.join("\u0000")) {
      L.dpKeys = keys.join("\u0000");
      clear(headRow);
      keys.forEach(function (k) { headRow.appendChild(el("th", null, k)); });
    }
    var body = table.tBodies[0];
    clear(body);
    flat.forEach(function (o) {
      var tr = el("tr");
      keys.forEach(function (k) {
        var v = o[k];
        var txt = v == null ? "" : k === "t" && typeof v === "number" && v > 1e9 ? fmtT(v - (L.start || v)) :
          typeof v === "number" ? fmtNum(v) : typeof v === "object" ? JSON.stringify(v) : String(v);
        tr.appendChild(el("td", typeof v === "number" ? "num" : null, txt));
      });
      body.appendChild(tr);
    });
  }

  // -- Peers (WebRTC rooms) ----------------------------------------------------------------------
  /* Peer simulators publish one data point per peer every few seconds (values with sentTotal, …).
     A Peers section shows each peer's latest numbers and, per packet family, the sum over peers
     over time (GET api/runs/<id>/peers); live runs fetch only the buckets since the last one. */
  var PEER_FAMILIES = ["sent", "received", "relayed", "all", "relevant", "duplicate", "expired"];
  var PEER_TITLES = { sent: "Sent", received: "Received", relayed: "Relayed", all: "All", relevant: "Relevant",
                      duplicate: "Duplicate", expired: "Expired" };
  var PEER_COLUMNS = [   // [key, heading, numeric]
    ["peer", "peer"], ["group", "group"], ["kind", "kind"], ["routine", "routine"],
    ["connected", "conn", 1], ["known", "known", 1], ["sent_per_s", "sent/s", 1], ["received_per_s", "recv/s", 1],
    ["relayed_per_s", "relayed/s", 1], ["duplicate_per_s", "dup/s", 1], ["expired_per_s", "expired/s", 1],
    ["relevant_per_s", "relevant/s", 1], ["latency_ms", "latency ms", 1], ["memory_mb", "mem MB", 1],
    ["position", "position"], ["last_seen", "last seen", 1]
  ];
  var PEER_BUCKET = 2;                        // seconds per point of the live peer charts
  var PEER_LIVE_BUCKETS = MAX_POINTS / PEER_BUCKET;

  function isPeerPoint(r) { return !!(r && r.values && r.values.sentTotal != null); }

  function peerView(prefix) {
    var box = $(prefix + "-peers");
    var P = { prefix: prefix, box: box, runId: null, rows: {}, list: [], order: {}, data: {}, times: [], groups: [],
              charts: null, chartKey: "", lastT: null, busy: false, mode: "packets", ctx: null };
    var head = el("div", "section-head");
    head.appendChild(el("h2", null, "Peers"));
    P.note = head.appendChild(el("span", "section-note"));
    P.note.id = prefix + "-peers-note";
    var unit = el("select", "peers-unit");
    unit.id = prefix + "-peers-unit";
    unit.setAttribute("aria-label", "the peer charts show");
    unit.appendChild(new Option("packets / s", "packets"));
    unit.appendChild(new Option("bytes / s", "bytes"));
    unit.addEventListener("change", function () { P.mode = unit.value; peersChartsDraw(P, true); });
    head.appendChild(unit);
    box.appendChild(head);
    P.chartsBox = box.appendChild(el("div", "charts peer-charts"));
    P.chartsBox.id = prefix + "-peer-charts";
    var wrap = box.appendChild(el("div", "table-wrap"));
    var table = P.table = wrap.appendChild(el("table", "sortable peers-table"));
    table.id = prefix + "-peers-table";
    var tr = el("tr");
    PEER_COLUMNS.forEach(function (c) {
      var th = el("th", c[2] ? "num" : null, c[1]);
      th.dataset.key = c[0];
      if (c[2]) th.dataset.sort = "num";
      tr.appendChild(th);
    });
    table.appendChild(el("thead")).appendChild(tr);
    table.appendChild(el("tbody"));
    sortableHead(table, function () { P.order.keys = null; placeRows(table, table.tBodies[0], P.list, P.order); });
    return P;
  }

  function peersReset(P) {
    if (P.charts) Object.keys(P.charts).forEach(function (k) { if (P.charts[k].plot) P.charts[k].plot.destroy(); });
    clear(P.chartsBox);
    clear(P.table.tBodies[0]);
    P.runId = null; P.rows = {}; P.list = []; P.order = {}; P.data = {}; P.times = []; P.groups = [];
    P.charts = null; P.chartKey = ""; P.lastT = null; P.busy = false; P.ctx = null;
    P.box.hidden = true;
  }

  /* Fetch (the new part of) a run's peers and draw them. `ctx`: {sync, events, live?, bucket?, limit?};
     `current()` says whether the view still shows that run when the answer comes. */
  function peersLoad(P, runId, ctx, current) {
    if (P.busy) return;
    if (P.runId !== runId) { peersReset(P); P.runId = runId; }
    P.ctx = ctx;
    var bucket = ctx.bucket || PEER_BUCKET;
    var q = "?by=group&bucket=" + bucket + "&limit=" + (ctx.limit || PEER_LIVE_BUCKETS);
    var last = P.times[P.times.length - 1];
    if (last != null) q += "&since=" + last;    // the last bucket again: it may have grown
    P.busy = true;
    api("GET", "api/runs/" + enc(runId) + "/peers" + q).then(function (res) {
      P.busy = false;
      if (!res.ok || P.runId !== runId || !current()) return;
      var d = res.data || {};
      P.bucket = d.bucket || bucket;
      if (d.last_t != null) P.lastT = Math.max(P.lastT || 0, d.last_t);
      peersMergeSeries(P, asList(d, "series"), ctx.limit || PEER_LIVE_BUCKETS);
      peersTable(P, asList(d, "peers"), !!d.truncated);
      if (!P.list.length && !P.times.length) return;
      P.box.hidden = false;
      peersChartsDraw(P, false);
    });
  }

  function peersMergeSeries(P, rows, keep) {
    rows.forEach(function (r) {
      var slot = P.data[r.t];
      if (!slot) { slot = P.data[r.t] = {}; P.times.push(r.t); }
      slot[r.group == null ? "" : r.group] = r;
      if (r.group != null && P.groups.indexOf(r.group) < 0) P.groups.push(r.group);
    });
    P.times.sort(function (a, b) { return a - b; });
    if (P.times.length > keep) P.times.splice(0, P.times.length - keep).forEach(function (t) { delete P.data[t]; });
    P.groups.sort();
  }

  function peersTable(P, peers, truncated) {
    var table = P.table;
    peers.forEach(function (p) {
      var key = p.group + "\u0000" + p.peer;
      var r = P.rows[key];
      if (!r) {
        var tr = el("tr");
        tr.dataset.peer = p.peer;
        r = P.rows[key] = { key: key, tr: tr, v: {}, c: {} };
        PEER_COLUMNS.forEach(function (c) { r.c[c[0]] = tr.appendChild(el("td", c[2] ? "num" : c[0] === "peer" ? "mono" : null)); });
        r.badge = r.c.kind.appendChild(el("span", "peer-kind"));
        P.list.push(r);
      }
      r.p = p;
      r.v = {};
      PEER_COLUMNS.forEach(function (c) { r.v[c[0]] = p[c[0]]; });
      r.v.position = p.position ? p.position.map(function (x) { return x == null ? "–" : fmtNum(x); }).join(", ") : "";
      setText(r.c.peer, p.peer);
      setText(r.c.group, p.group);
      r.badge.className = "peer-kind peer-kind-" + (p.kind === "browser" ? "browser" : "aiortc");
      setText(r.badge, p.kind || "aiortc");
      setText(r.c.routine, p.routine || "");
      setText(r.c.connected, fmtInt(p.connected));
      setText(r.c.known, fmtInt(p.known));
      ["sent_per_s", "received_per_s", "relayed_per_s", "duplicate_per_s", "expired_per_s", "relevant_per_s", "memory_mb"].forEach(function (k) {
        setText(r.c[k], fmtNum(p[k]));
      });
      setText(r.c.latency_ms, fmtMs(p.latency_ms != null ? p.latency_ms : p.rtt_ms));
      setText(r.c.position, r.v.position);
      setText(r.c.last_seen, fmtT(p.last_seen));
    });
    var browsers = 0, stale = 0, limit = Math.max(10, 3 * (P.bucket || PEER_BUCKET));
    P.list.forEach(function (r) {
      var old = P.lastT != null && P.lastT - r.p.last_seen > limit;
      if (old) stale++;
      if (r.p.kind === "browser") browsers++;
      var cls = old ? "stale" : "";
      if (r.tr.className !== cls) r.tr.className = cls;
      r.tr.title = old ? "no data point for " + fmtT(P.lastT - r.p.last_seen) : "";
    });
    placeRows(table, table.tBodies[0], P.list, P.order);
    setText(P.note, P.list.length + " peer" + (P.list.length === 1 ? "" : "s") + " (" + browsers + " browser)" +
      (stale ? " · " + stale + " silent" : "") + (truncated ? " · the first " + P.list.length + " shown" : "") +
      " · charts: sum over peers per " + (P.bucket || PEER_BUCKET) + " s; click a heading to sort");
  }

  function peersChartsDraw(P, rebuild) {
    if (!P.times.length) { P.chartsBox.hidden = true; return; }
    P.chartsBox.hidden = false;
    var groups = P.groups.length ? P.groups : [""];
    var key = groups.join("\u0000") + "\u0001" + P.mode;
    var bytes = P.mode === "bytes";
    if (rebuild || !P.charts || key !== P.chartKey) {
      if (P.charts) Object.keys(P.charts).forEach(function (k) { if (P.charts[k].plot) P.charts[k].plot.destroy(); });
      clear(P.chartsBox);
      P.chartKey = key;
      P.charts = {};
      var gc = function (g) { var i = groups.indexOf(g); return i < 0 ? "#9ca3af" : color(i); };
      var ctx = { sync: P.ctx.sync, events: P.ctx.events, groupColor: gc };
      var span = function (u, min, max) {
        var xs = u.data[0];
        var lo = xs.length ? xs[0] : 0, hi = xs.length ? xs[xs.length - 1] : 1;
        if (min == null || min < lo - 1 || (max != null && max > hi + 1)) { min = lo; max = hi; }
        return [min, Math.max(max, min + 10)];
      };
      // all the cards first: a chart takes the width its card has when it is drawn
      PEER_FAMILIES.forEach(function (f) {
        P.charts[f] = chartCard(P.chartsBox, f, PEER_TITLES[f], (bytes ? "bytes" : "packets") + " per second, summed over peers");
      });
      PEER_FAMILIES.forEach(function (f) {
        var cc = P.charts[f];
        var series = groups.map(function (g, i) { return line(g || "all peers", color(i), { fill: fade(color(i), 0.08) }); });
        if (groups.length > 1) series.push(line("total", "#374151", { dash: [4, 3], width: 1.25 }));
        var empty = [[]].concat(series.map(function () { return []; }));
        plot(cc, series, empty, ctx, { range: span, height: 150 });
      });
    }
    var X = P.times.slice();
    PEER_FAMILIES.forEach(function (f) {
      var field = f + (bytes ? "BytesPerSecond" : "PerSecond");
      var data = [X];
      groups.forEach(function (g) {
        data.push(X.map(function (t) { var r = P.data[t][g]; return r ? r[field] : null; }));
      });
      if (groups.length > 1) data.push(X.map(function (t) {
        var slot = P.data[t], sum = null;
        Object.keys(slot).forEach(function (g) { sum = (sum || 0) + slot[g][field]; });
        return sum;
      }));
      P.charts[f].plot.setData(data);
    });
    P.chartsBox.dataset.points = String(X.length);
  }

  var PEERS = { live: peerView("live"), detail: peerView("detail") };

  // -- History -----------------------------------------------------------------------------------
  var historyBusy = false;
  function loadHistory() {
    if (historyBusy) return;
    historyBusy = true;
    api("GET", "api/runs").then(function (res) {
      historyBusy = false;
      if (!res.ok) return;
      S.runs = asList(res.data, "runs");
      renderHistory();
    });
  }
  $("history-refresh").addEventListener("click", loadHistory);

  function renderHistory() {
    var body = $("history-table").tBodies[0];
    clear(body);
    $("history-empty").hidden = S.runs.length > 0;
    S.runs.forEach(function (r) {
      var tr = el("tr");
      tr.dataset.run = r.id;
      if (S.detail && S.detail.id === r.id) tr.className = "selected";
      tr.appendChild(el("td", "mono", r.id));
      var st = el("td"); var b = el("span"); statusBadge(b, r.status); st.appendChild(b);
      if (r.active) st.appendChild(el("span", "muted small", " live"));
      tr.appendChild(st);
      tr.appendChild(el("td", null, r.profile || ""));
      tr.appendChild(el("td", null, fmtDate(r.started_at)));
      tr.appendChild(el("td", "num", r.duration_s != null ? fmtT(r.duration_s) : "–"));
      tr.appendChild(el("td", "num", fmtInt(r.requests)));
      tr.appendChild(el("td", "num", fmtMs(r.p95_ms)));
      var er = el("td", "num", fmtPct(r.error_rate));
      if (r.error_rate > 0.01) er.className = "num bad";
      tr.appendChild(er);
      var bl = el("td");
      if (r.baseline) { var s = el("span", "star", "★"); s.title = "baseline of " + (r.profile || "its profile"); bl.appendChild(s); }
      tr.appendChild(bl);
      tr.addEventListener("click", function () { openDetail(r.id); });
      body.appendChild(tr);
    });
    fillCompareSelects();
  }

  function fillCompareSelects() {
    var b = $("compare-baseline"), c = $("compare-current");
    var kb = b.value, kc = c.value;
    [b, c].forEach(function (sel) {
      clear(sel);
      S.runs.forEach(function (r) {
        sel.appendChild(new Option(r.id + " · " + (r.profile || "") + (r.baseline ? " ★" : "") + " · " + (r.status || ""), r.id));
      });
    });
    if (!S.runs.length) return;
    var star = S.runs.filter(function (r) { return r.baseline; })[0];
    b.value = kb || (star ? star.id : (S.runs[1] || S.runs[0]).id);
    c.value = kc || S.runs[0].id;
  }

  function openDetail(id) {
    if (S.detail && S.detail.charts) Object.keys(S.detail.charts).forEach(function (k) { if (S.detail.charts[k].plot) S.detail.charts[k].plot.destroy(); });
    var D = S.detail = { id: id, charts: null, events: [], sync: uPlot.sync("run-" + id), latency: "total" };
    Array.prototype.forEach.call($("history-table").tBodies[0].rows, function (tr) { tr.className = tr.dataset.run === id ? "selected" : ""; });
    $("run-detail").hidden = false;
    setText($("detail-title"), id);
    setText($("detail-sub"), "loading…");
    clear($("detail-charts")); clear($("detail-cards")); clear($("detail-legend"));
    peersReset(PEERS.detail);
    if (S.view === "history") history.replaceState(null, "", "#history/" + id);
    var base = "api/runs/" + enc(id);
    Promise.all([
      api("GET", base),
      api("GET", base + "/series?by=group"),
      api("GET", base + "/series?by=run"),
      api("GET", base + "/events")
    ]).then(function (res) {
      if (S.detail !== D) return;
      if (!res[0].ok) { setText($("detail-sub"), errorText(res[0])); return; }
      var info = res[0].data || {};
      var run = info.run || {};
      D.run = run;
      D.summary = info.summary || null;
      D.start = epoch(run.started_at);
      renderDetailHead(D, info);
      var rows = asList(res[1].data, "rows");
      var total = asList(res[2].data, "rows");
      if (D.start == null) D.start = rows.length ? rows[0].t : total.length ? total[0].t : 0;
      D.events = asList(res[3].data, "events").map(function (e) {
        return { x: typeof e.offset_s === "number" ? e.offset_s : e.t - D.start, type: e.type, group: e.group, detail: e.detail };
      });
      renderDetailCharts(D, rows, total);
      eventLegend($("detail-legend"), D.events);
      renderDetailTables(D);
      // peers over the whole run, in about 400 points (2 s buckets at least)
      var bucket = Math.max(PEER_BUCKET, Math.ceil((run.duration_s || 0) / 400));
      peersLoad(PEERS.detail, id, { sync: D.sync, events: function () { return D.events; }, bucket: bucket, limit: 100000 },
        function () { return S.detail === D; });
      $("run-detail").scrollIntoView({ behavior: "smooth", block: "start" });
    });
  }

  function renderDetailHead(D, info) {
    var run = D.run, sm = D.summary || {};
    statusBadge($("detail-status"), run.status);
    setText($("detail-sub"), "profile " + (run.profile || "?") + " · started " + fmtDate(run.started_at) +
      (run.duration_s != null ? " · " + fmtT(run.duration_s) : "") + (run.reason ? " · " + run.reason : ""));
    var live = !!(info.live || run.active) && !FINAL[run.status];
    $("detail-live").hidden = !live;
    var dl = $("detail-downloads");
    clear(dl);
    ["html", "json", "junit", "csv"].forEach(function (f) {
      var a = el("a", "btn small ghost", f === "html" ? "report.html" : f);
      a.href = "api/runs/" + enc(D.id) + "/report/" + f + (f === "html" ? "?download=0" : "");
      if (f === "html") { a.target = "_blank"; a.rel = "noopener"; } else a.setAttribute("download", "");
      dl.appendChild(a);
    });
    var isBase = S.runs.some(function (r) { return r.id === D.id && r.baseline; });
    setText($("detail-baseline"), isBase ? "★ Baseline" : "☆ Mark baseline");
    $("detail-baseline").disabled = isBase;
    var t = sm.totals || {};
    var cards = $("detail-cards");
    function card(label, value, sub, bad) {
      var c = el("div", "card" + (bad ? " bad" : ""));
      c.appendChild(el("div", "card-label", label));
      c.appendChild(el("div", "card-value", value));
      c.appendChild(el("div", "card-sub", sub || ""));
      cards.appendChild(c);
    }
    card("Duration", fmtT(sm.duration_s != null ? sm.duration_s : run.duration_s), run.status);
    card("Requests", fmtInt(t.requests != null ? t.requests : run.requests), fmtInt(t.failures) + " failures");
    card("Requests / s", fmtNum(t.rps), "mean over the run");
    card("Error rate", fmtPct(t.error_rate != null ? t.error_rate : run.error_rate), "", (t.error_rate || run.error_rate || 0) > 0.01);
    card("p95", fmtMs(t.p95_ms != null ? t.p95_ms : run.p95_ms) + " ms", "p99 " + fmtMs(t.p99_ms) + " ms");
  }
  $("detail-baseline").addEventListener("click", function () {
    var D = S.detail;
    if (!D) return;
    api("POST", "api/runs/" + enc(D.id) + "/baseline", {}).then(function (res) {
      if (!res.ok) { toast(errorText(res), true); return; }
      toast(D.id + " is now the baseline of " + (D.run && D.run.profile || "its profile"));
      setText($("detail-baseline"), "★ Baseline");
      $("detail-baseline").disabled = true;
      loadHistory();
    });
  });
  $("detail-live").addEventListener("click", function () { if (S.detail) openLive(S.detail.id, S.detail.run && S.detail.run.status); });

  function renderDetailCharts(D, rows, total) {
    var box = $("detail-charts");
    clear(box);
    var ts = {}, groups = {};
    rows.forEach(function (r) { ts[r.t] = 1; if (r.group != null) groups[r.group] = 1; });
    total.forEach(function (r) { ts[r.t] = 1; });
    var T = Object.keys(ts).map(Number).sort(function (a, b) { return a - b; });
    var idx = {};
    T.forEach(function (t, i) { idx[t] = i; });
    var X = T.map(function (t) { return t - D.start; });
    var G = Object.keys(groups).sort();
    D.groups = G;
    function col(filter, field) {
      var out = new Array(T.length).fill(null);
      rows.forEach(function (r) { if (filter(r)) out[idx[r.t]] = r[field]; });
      return out;
    }
    function totalCol(field) {
      var out = new Array(T.length).fill(null);
      total.forEach(function (r) { out[idx[r.t]] = r[field]; });
      return out;
    }
    var ctx = { sync: D.sync, events: function () { return D.events; }, groupColor: function (g) { var i = G.indexOf(g); return i < 0 ? "#9ca3af" : color(i); } };
    var lo = X.length ? X[0] : 0, hi = X.length ? X[X.length - 1] : 1;
    D.events.forEach(function (e) { lo = Math.min(lo, e.x); hi = Math.max(hi, e.x); });
    var range = function (u, min, max) {
      if (min == null) { min = lo; max = hi; }
      return [Math.min(min, lo), Math.max(max, hi, min + 1)];
    };
    D.charts = {
      users: chartCard(box, "users", "Users", "per group (busy users in open-model groups)"),
      rps: chartCard(box, "rps", "Throughput", "requests per second, per group"),
      latency: chartCard(box, "latency", "Latency", "p50 / p95 / p99, ms, per second"),
      errors: chartCard(box, "errors", "Errors", "failures per second, per group")
    };
    var gf = function (g) { return function (r) { return r.group === g; }; };
    plot(D.charts.users, G.map(function (g, i) { return line(g, color(i), { paths: uPlot.paths.stepped({ align: 1 }) }); }),
      [X].concat(G.map(function (g) { return col(gf(g), "users"); })), ctx, { range: range });
    var rpsSeries = G.map(function (g, i) { return line(g, color(i)); });
    var rpsData = [X].concat(G.map(function (g) { return col(gf(g), "rps"); }));
    if (G.length > 1 && total.length) { rpsSeries.push(line("total", "#374151", { dash: [4, 3], width: 1.25 })); rpsData.push(totalCol("rps")); }
    plot(D.charts.rps, rpsSeries, rpsData, ctx, { range: range });
    function latency(v) {
      var src = v === "total" ? { f: null } : { f: gf(v.slice(2)) };
      var data = [X].concat(["p50_ms", "p95_ms", "p99_ms"].map(function (k) { return src.f ? col(src.f, k) : totalCol(k); }));
      plot(D.charts.latency, ["p50", "p95", "p99"].map(function (p) { return line(p, LATENCY[p], p === "p99" ? { fill: fade(LATENCY.p99, 0.06) } : {}); }),
        data, ctx, { range: range });
    }
    latency(total.length ? "total" : (G.length ? "g:" + G[0] : "total"));
    var opts = total.length ? [{ text: "whole run", value: "total" }] : [];
    if (G.length) opts.push({ group: "groups", items: G.map(function (g) { return { text: g, value: "g:" + g }; }) });
    select(D.charts.latency, "latency of", opts, latency);
    plot(D.charts.errors, G.map(function (g, i) { return line(g, color(i), { fill: fade(color(i), 0.12) }); }),
      [X].concat(G.map(function (g) { return col(gf(g), "failures_s"); })), ctx, { range: range });
    box.dataset.points = String(X.length);
    box.dataset.rendered = "1";
  }

  var detailOrder = {};
  function renderDetailTables(D) {
    var sm = D.summary || {};
    var table = $("detail-stats"), body = table.tBodies[0];
    clear(body);
    detailOrder.keys = null;
    D.statRows = {};
    D.statList = (sm.endpoints || []).map(function (e) { var r = statRow(table, D.statRows, e); setStat(r, e); return r; });
    placeRows(table, body, D.statList, detailOrder);
    if (!D.statList.length) {
      var tr = el("tr"); var td = el("td", "muted", D.summary ? "no requests recorded" : "no summary for this run yet");
      td.colSpan = 10; tr.appendChild(td); body.appendChild(tr);
    }
    fillErrors($("detail-errors"), sm.errors || [], null);
    $("detail-errors").parentNode.hidden = false;
    if (!(sm.errors || []).length) {
      var b = $("detail-errors").tBodies[0];
      var tr2 = el("tr"); var td2 = el("td", "good", "No errors."); td2.colSpan = 4; tr2.appendChild(td2); b.appendChild(tr2);
    }
    var th = sm.thresholds || [];
    fillThresholds($("detail-thresholds"), th);
    if (!th.length) $("detail-thresholds").appendChild(el("li", "muted", "no thresholds"));
  }
  sortableHead($("detail-stats"), function () {
    detailOrder.keys = null;
    if (S.detail && S.detail.statList) placeRows($("detail-stats"), $("detail-stats").tBodies[0], S.detail.statList, detailOrder);
  });

  // -- Compare -----------------------------------------------------------------------------------
  $("compare-btn").addEventListener("click", function () {
    var b = $("compare-baseline").value, c = $("compare-current").value;
    var out = $("compare-result");
    clear(out);
    if (!b || !c) return;
    out.appendChild(el("p", "muted", "comparing…"));
    api("GET", "api/compare?run=" + enc(c) + "&baseline=" + enc(b)).then(function (res) {
      clear(out);
      if (!res.ok) { out.appendChild(el("p", "field-msg", errorText(res))); return; }
      renderCompare(out, res.data || {});
    });
  });

  function renderCompare(out, d) {
    var verdict = el("p", "verdict-line " + (d.regression ? "bad" : "good"),
      d.regression ? "✗ " + (d.regressions || []).length + " regression(s)" : "✓ no regression");
    out.appendChild(verdict);
    var wrap = el("div", "table-wrap");
    var table = el("table");
    table.id = "compare-table";
    var head = el("tr");
    ["endpoint", "p95 ms", "Δ p95", "p99 ms", "Δ p99", "err %", "Δ err", "rps", "Δ rps"].forEach(function (h, i) {
      head.appendChild(el("th", i ? "num" : null, h));
    });
    table.appendChild(el("thead")).appendChild(head);
    var body = table.appendChild(el("tbody"));
    function cls(status) {
      return status === "regression" ? "num delta-bad" : status === "better" ? "num delta-good" : status === "worse" ? "num warn" : "num";
    }
    function pct(v) { return v == null ? "–" : (v > 0 ? "+" : "") + v.toFixed(1) + "%"; }
    (d.rows || []).forEach(function (r) {
      var tr = el("tr", r.regression ? "regressed" : null);
      var b = r.baseline || {}, c = r.current || {}, dl = r.delta || {}, st = r.status || {};
      var label = r.scope === "total" ? "total" : (r.group || "") + " / " + (r.name || "");
      var first = el("td", r.scope === "total" ? null : "name", label);
      if (r.scope === "total") first.style.fontWeight = "650";
      tr.appendChild(first);
      tr.appendChild(el("td", "num", fmtMs(b.p95_ms) + " → " + fmtMs(c.p95_ms)));
      tr.appendChild(el("td", cls(st.p95_ms), pct(dl.p95_pct)));
      tr.appendChild(el("td", "num", fmtMs(b.p99_ms) + " → " + fmtMs(c.p99_ms)));
      tr.appendChild(el("td", cls(st.p99_ms), pct(dl.p99_pct)));
      tr.appendChild(el("td", "num", fmtPct(b.error_rate) + " → " + fmtPct(c.error_rate)));
      var pp = dl.error_rate_pp;
      tr.appendChild(el("td", cls(st.error_rate), pp == null ? "–" : (pp > 0 ? "+" : "") + pp.toFixed(2) + " pp"));
      tr.appendChild(el("td", "num", fmtNum(b.rps) + " → " + fmtNum(c.rps)));
      tr.appendChild(el("td", "num muted", pct(dl.rps_pct)));
      body.appendChild(tr);
    });
    wrap.appendChild(table);
    out.appendChild(wrap);
    function list(title, items, cl) {
      if (!items || !items.length) return;
      out.appendChild(el("p", "small " + (cl || "muted"), title));
      var ul = el("ul", "small " + (cl || "muted"));
      items.forEach(function (x) { ul.appendChild(el("li", null, typeof x === "string" ? x : (x.group + " / " + x.name))); });
      out.appendChild(ul);
    }
    list("Regressions", d.regressions, "bad");
    list("Only in the current run", d.added);
    list("Only in the baseline", d.removed);
    list("Notes", d.notes);
  }

  // -- boot --------------------------------------------------------------------------------------
  function route() {
    var h = location.hash.replace(/^#/, "");
    var parts = h.split("/");
    var view = parts[0], id = parts.slice(1).join("/");
    if (view === "live" && id) { openLive(id); return; }
    if (view === "history") { show("history"); if (id) openDetail(id); return; }
    if (view === "live" || view === "start") { show(view); return; }
    // no hash: a running run if there is one, else Start
    api("GET", "api/runs").then(function (res) {
      var runs = asList(res.data, "runs");
      var active = runs.filter(function (r) { return r.active && !FINAL[r.status]; })[0];
      if (active) openLive(active.id, active.status); else show("start");
    });
  }
  var booted = false;
  function boot() {
    loadSession().then(function (ok) {
      if (!ok) return;
      connectSocket();
      loadProfiles();
      if (!booted) { booted = true; route(); }
    });
  }
  show("start", false);
  boot();
})();
