/* harness report: draws the run's charts with uPlot, marks lifecycle events on every time axis and
   makes the tables sortable. Data comes from the JSON block #report-data; every string from it is
   put into the page as text (textContent, option.text, canvas fillText), never as HTML. */
(function () {
  "use strict";

  var D = JSON.parse(document.getElementById("report-data").textContent);
  var X = D.x;
  var PALETTE = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#0891b2", "#db2777", "#65a30d",
                 "#ea580c", "#4f46e5", "#0d9488", "#be123c", "#854d0e"];
  var LATENCY = { p50: "#2563eb", p95: "#d97706", p99: "#dc2626" };
  var EVENT_COLORS = {
    run_started: "#16a34a", stopping: "#7c3aed", run_stopped: "#6b7280", worker_exited: "#ea580c",
    worker_restarted: "#d97706", worker_unresponsive: "#dc2626", worker_given_up: "#dc2626",
    threshold_aborted: "#dc2626", degradation: "#dc2626", scaled_manually: "#0891b2",
    group_finished: "#6b7280", target_restarted: "#d97706", recovered_aborted: "#dc2626"
  };
  var EVENT_LABELS = {
    run_started: "start", stopping: "stopping", run_stopped: "stopped", worker_exited: "worker exited",
    worker_restarted: "worker restarted", worker_unresponsive: "worker unresponsive",
    worker_given_up: "worker given up", threshold_aborted: "threshold abort", degradation: "degradation",
    scaled_manually: "scaled by hand", group_finished: "group finished", target_restarted: "target restarted"
  };
  var SYNC = uPlot.sync("run-" + D.run_id);
  var charts = {};
  var drawn = 0;
  var expected = 0;

  // -- formatting --------------------------------------------------------------------------------
  function fmtT(s) {
    if (s == null) return "–";
    var neg = s < 0; s = Math.abs(s);
    var out;
    if (s < 60) out = (Math.round(s * 10) / 10) + "s";
    else if (s < 3600) {
      var m = Math.floor(s / 60), r = Math.round(s - m * 60);
      out = m + "m" + (r ? (r < 10 ? "0" : "") + r + "s" : "");
    } else {
      var h = Math.floor(s / 3600), mm = Math.round((s - h * 3600) / 60);
      out = h + "h" + (mm ? (mm < 10 ? "0" : "") + mm + "m" : "");
    }
    return (neg ? "-" : "") + out;
  }
  function fmtNum(v) {
    if (v == null) return "–";
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a === 0) return "0";
    return v.toFixed(a >= 1 ? 2 : 3);
  }
  /* Axis ticks are round numbers already: no padding zeros ("80", "0.5", "12k"). */
  function fmtTick(v) {
    if (v == null) return "";
    var a = Math.abs(v);
    if (a >= 1e6) return +(v / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return +(v / 1e3).toFixed(1) + "k";
    return String(+v.toFixed(3));
  }
  function color(i) { return PALETTE[i % PALETTE.length]; }
  function fade(hex, alpha) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
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
    return fmtT(ev.t) + "  " + ev.type + (ev.group ? " [" + ev.group + "]" : "") +
      (parts.length ? "\n   " + parts.join(", ") : "");
  }

  // -- events -------------------------------------------------------------------------------------
  function isMajor(ev) {
    if (ev.type === "scaled" || ev.type === "worker_started" || ev.type === "group_started") return false;
    if (ev.type === "worker_exited" && ev.detail && ev.detail.exit_code === 0) return false;
    return true;
  }
  var EVENTS = (D.events || []).filter(function (e) { return typeof e.t === "number"; });
  var MAJOR = EVENTS.filter(isMajor);
  var MINOR = EVENTS.filter(function (e) { return !isMajor(e); });
  var TIMES = X.concat(EVENTS.map(function (e) { return e.t; }));
  var T_MIN = TIMES.length ? Math.min.apply(null, TIMES) : 0;
  var T_MAX = TIMES.length ? Math.max.apply(null, TIMES) : 1;

  function groupColor(name) {
    for (var i = 0; i < D.groups.length; i++) if (D.groups[i].group === name) return color(i);
    return "#9ca3af";
  }

  /* Major events closer than a few pixels share one label: "group finished (browse, api) · stopping". */
  function clusters(u) {
    var out = [];
    MAJOR.forEach(function (ev) {
      var x = Math.round(u.valToPos(ev.t, "x", true)) + 0.5;
      var last = out[out.length - 1];
      if (last && Math.abs(x - last.x) <= 6 * uPlot.pxRatio) last.events.push(ev);
      else out.push({ x: x, events: [ev] });
    });
    out.forEach(function (cl) {
      var parts = [], byType = {};
      cl.events.forEach(function (ev) {
        if (!(ev.type in byType)) { byType[ev.type] = []; parts.push(ev.type); }
        if (ev.group && byType[ev.type].indexOf(ev.group) < 0) byType[ev.type].push(ev.group);
      });
      cl.label = parts.map(function (t) {
        var name = EVENT_LABELS[t] || t.replace(/_/g, " ");
        return byType[t].length ? name + " (" + byType[t].join(", ") + ")" : name;
      }).join(" · ");
    });
    return out;
  }

  /* Draws lifecycle events on the plot: major ones as dashed lines with a label, minor ones (scaling
     steps, worker starts) as short ticks on the time axis; a tooltip lists the events under the cursor. */
  function eventsPlugin(extraLines) {
    var tip;
    function draw(u) {
      var ctx = u.ctx, b = u.bbox, px = uPlot.pxRatio;
      ctx.save();
      ctx.beginPath(); ctx.rect(b.left, b.top - 1, b.width, b.height + 2); ctx.clip();
      MINOR.forEach(function (ev) {
        var x = Math.round(u.valToPos(ev.t, "x", true)) + 0.5;
        ctx.strokeStyle = fade(ev.group ? groupColor(ev.group) : "#6b7280", 0.65);
        ctx.lineWidth = 2 * px; ctx.setLineDash([]);
        ctx.beginPath(); ctx.moveTo(x, b.top + b.height); ctx.lineTo(x, b.top + b.height - 7 * px); ctx.stroke();
      });
      var rows = [];
      ctx.font = (11 * px) + "px " + getComputedStyle(document.body).fontFamily;
      ctx.textBaseline = "top";
      ctx.textAlign = "left";
      clusters(u).forEach(function (cl) {
        var x = cl.x;
        if (x < b.left - 1 || x > b.left + b.width + 1) return;
        cl.events.forEach(function (ev) {
          var ex = Math.round(u.valToPos(ev.t, "x", true)) + 0.5;
          ctx.strokeStyle = EVENT_COLORS[ev.type] || "#475569";
          ctx.lineWidth = 1.25 * px; ctx.setLineDash([5 * px, 4 * px]);
          ctx.beginPath(); ctx.moveTo(ex, b.top); ctx.lineTo(ex, b.top + b.height); ctx.stroke();
        });
        var c = EVENT_COLORS[cl.events[cl.events.length - 1].type] || "#475569";
        var label = cl.label;
        var w = ctx.measureText(label).width + 8 * px, h = 15 * px;
        var lx = x + 3 * px;
        if (lx + w > b.left + b.width) lx = Math.max(b.left, x - 3 * px - w);
        for (var row = 0; row < 4; row++) {
          var busy = rows[row] || [];
          var free = busy.every(function (r) { return lx + w < r[0] - 2 * px || lx > r[1] + 2 * px; });
          if (!free) continue;
          busy.push([lx, lx + w]); rows[row] = busy;
          var ly = b.top + 3 * px + row * (h + 2 * px);
          ctx.setLineDash([]);
          ctx.fillStyle = "rgba(255,255,255,0.9)";
          ctx.fillRect(lx, ly, w, h);
          ctx.strokeStyle = fade(c, 0.55); ctx.lineWidth = 1 * px;
          ctx.strokeRect(lx, ly, w, h);
          ctx.fillStyle = c;
          ctx.fillText(label, lx + 4 * px, ly + 2 * px);
          break;
        }
      });
      (extraLines || []).forEach(function (line) {
        if (!u.scales[line.scale] || u.scales[line.scale].min == null) return;
        var y = Math.round(u.valToPos(line.value, line.scale, true)) + 0.5;
        if (y < b.top || y > b.top + b.height) return;
        ctx.strokeStyle = line.color; ctx.lineWidth = 1 * px; ctx.setLineDash([2 * px, 3 * px]);
        ctx.beginPath(); ctx.moveTo(b.left, y); ctx.lineTo(b.left + b.width, y); ctx.stroke();
        ctx.setLineDash([]); ctx.fillStyle = line.color; ctx.textBaseline = "bottom";
        ctx.fillText(line.label, b.left + 4 * px, y - 2 * px);
        ctx.textBaseline = "top";
      });
      ctx.restore();
    }
    function cursor(u) {
      if (!tip) return;
      var l = u.cursor.left;
      if (l == null || l < 0) { tip.hidden = true; return; }
      var near = EVENTS.filter(function (ev) { return Math.abs(u.valToPos(ev.t, "x") - l) <= 4; });
      if (!near.length) { tip.hidden = true; return; }
      tip.textContent = near.slice(0, 8).map(describe).join("\n") + (near.length > 8 ? "\n…" : "");
      tip.hidden = false;
      var left = l + 12;
      if (left + 300 > u.over.clientWidth) left = Math.max(0, l - 312);
      tip.style.left = left + "px";
      tip.style.top = "8px";
    }
    return {
      hooks: {
        init: function (u) {
          tip = document.createElement("div");
          tip.className = "evtip"; tip.hidden = true;
          u.over.appendChild(tip);
        },
        draw: draw,
        setCursor: cursor
      }
    };
  }

  // -- charts -------------------------------------------------------------------------------------
  function makeChart(key, series, data, opts) {
    var card = document.getElementById("chart-" + key);
    var el = card.querySelector(".chart");
    if (charts[key]) { charts[key].destroy(); charts[key] = null; }
    var first = true;
    var options = {
      width: Math.max(280, el.clientWidth),
      height: 260,
      cursor: { sync: { key: SYNC.key }, drag: { x: true, y: false }, points: { size: 6 } },
      scales: {
        x: {
          time: false,
          range: function (u, min, max) {
            if (min == null) { min = T_MIN; max = T_MAX; }
            return [Math.min(min, T_MIN), Math.max(max, T_MAX, min + 1)];
          }
        }
      },
      axes: [
        {
          stroke: "#6b7280", font: "11px " + getComputedStyle(document.body).fontFamily,
          grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#e5e7eb", width: 1 },
          values: function (u, splits) { return splits.map(fmtT); }
        },
        {
          stroke: "#6b7280", font: "11px " + getComputedStyle(document.body).fontFamily, size: 52,
          grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#e5e7eb", width: 1 },
          values: function (u, splits) { return splits.map(fmtTick); }
        }
      ],
      series: [{ label: "t", value: function (u, v) { return fmtT(v); } }].concat(series),
      legend: { live: true },
      plugins: [eventsPlugin(opts && opts.lines)],
      hooks: {
        draw: [function () {
          if (!first) return;
          first = false; drawn++;
          if (drawn >= expected) rendered();
        }]
      }
    };
    if (opts && opts.configure) opts.configure(options);
    var chart = new uPlot(options, [X].concat(data), el);
    charts[key] = chart;
    return chart;
  }

  /* Tells a test (or anyone) that the charts are drawn, and where their plot areas are on the page. */
  function rendered() {
    var boxes = Object.keys(charts).filter(function (k) { return charts[k]; }).map(function (k) {
      var r = charts[k].over.getBoundingClientRect();
      return {
        chart: k, x: Math.round(r.left + window.scrollX), y: Math.round(r.top + window.scrollY),
        w: Math.round(r.width), h: Math.round(r.height)
      };
    });
    document.body.dataset.chartBoxes = JSON.stringify(boxes);
    document.body.dataset.chartsRendered = String(drawn);
  }

  function line(label, stroke, extra) {
    var s = {
      label: label, stroke: stroke, width: 1.75, spanGaps: false,
      value: function (u, v) { return fmtNum(v); }
    };
    for (var k in extra || {}) s[k] = extra[k];
    return s;
  }

  function select(key, name, options, onChange) {
    var box = document.getElementById("chart-" + key).querySelector(".controls");
    var sel = document.createElement("select");
    sel.setAttribute("aria-label", name);
    options.forEach(function (o) {
      if (o.group) {
        var og = document.createElement("optgroup");
        og.label = o.group;
        o.items.forEach(function (it) { og.appendChild(new Option(it.text, it.value)); });
        sel.appendChild(og);
      } else sel.appendChild(new Option(o.text, o.value));
    });
    sel.addEventListener("change", function () { onChange(sel.value); });
    box.appendChild(sel);
    return sel;
  }

  var requestNames = D.names.filter(function (n) { return n.kind !== "error"; });
  function nameLabel(n) { return n.group + " / " + n.name; }

  function usersChart() {
    var series = [], data = [];
    D.groups.forEach(function (g, i) {
      series.push(line(g.group, color(i), { paths: uPlot.paths.stepped({ align: 1 }) }));
      data.push(g.users);
    });
    if (D.groups.length > 1) {
      series.push(line("total", "#374151", { dash: [4, 3], width: 1.25, paths: uPlot.paths.stepped({ align: 1 }) }));
      data.push(D.total.users);
    }
    makeChart("users", series, data, {
      configure: function (o) { o.scales.y = { range: function (u, min, max) { return [0, Math.max(1, (max || 0) * 1.08)]; } }; }
    });
  }

  /* Per group (default) or per name, for a field of the series: rps or errors. */
  function breakdownChart(key, field, mode) {
    var series = [], data = [];
    var items = mode === "name" ? (field === "rps" ? requestNames : D.names) : D.groups;
    if (mode.indexOf("group:") === 0) {
      var g = mode.slice(6);
      items = (field === "rps" ? requestNames : D.names).filter(function (n) { return n.group === g; });
    }
    items.forEach(function (it, i) {
      var label = it.name !== undefined ? (mode === "name" ? nameLabel(it) : it.name) : it.group;
      var c = it.name !== undefined ? color(i) : color(i);
      series.push(line(label, c, field === "errors" ? { fill: fade(c, 0.12) } : {}));
      data.push(it[field]);
    });
    if (mode === "group" && items.length > 1) {
      series.push(line("total", "#374151", { dash: [4, 3], width: 1.25 }));
      data.push(D.total[field]);
    }
    if (!items.length) { series.push(line("total", "#374151")); data.push(D.total[field]); }
    makeChart(key, series, data, {
      configure: function (o) { o.scales.y = { range: function (u, min, max) { return [0, Math.max(1, max * 1.08)]; } }; }
    });
  }

  function breakdownOptions(field) {
    var opts = [{ text: "per group", value: "group" }, { text: "per name", value: "name" }];
    if (D.groups.length > 1) {
      opts.push({
        group: "names in one group",
        items: D.groups.map(function (g) { return { text: g.group, value: "group:" + g.group }; })
      });
    }
    return opts;
  }

  function latencySource(value) {
    if (value === "total") return { label: "whole run", src: D.total };
    if (value.indexOf("g:") === 0) {
      var gi = +value.slice(2);
      return { label: D.groups[gi].group, src: D.groups[gi] };
    }
    var ni = +value.slice(2);
    return { label: nameLabel(D.names[ni]), src: D.names[ni] };
  }

  function latencyChart(value) {
    var s = latencySource(value).src;
    var series = ["p50", "p95", "p99"].map(function (p) {
      return line(p, LATENCY[p], p === "p99" ? { fill: fade(LATENCY.p99, 0.06) } : {});
    });
    makeChart("latency", series, [s.p50, s.p95, s.p99], {
      configure: function (o) {
        o.scales.y = { range: function (u, min, max) { return [0, Math.max(1, (max || 0) * 1.08)]; } };
      }
    });
  }

  function healthChart() {
    var h = D.health;
    var series = [
      line("CPU max %", "#9333ea", { scale: "%", fill: fade("#9333ea", 0.08) }),
      line("loop lag max ms", "#0891b2", { scale: "ms" })
    ];
    makeChart("health", series, [h.cpu, h.lag], {
      lines: [
        { scale: "%", value: h.cpu_warning, color: "#dc2626", label: "CPU " + h.cpu_warning + "% warning" }
      ],
      configure: function (o) {
        o.scales["%"] = { range: function (u, min, max) { return [0, Math.max(100, max || 0)]; } };
        o.scales.ms = { range: function (u, min, max) { return [0, Math.max(h.lag_warning_ms * 0.2, (max || 0) * 1.15)]; } };
        o.axes[1].scale = "%";
        o.axes[1].values = function (u, splits) { return splits.map(function (v) { return v + "%"; }); };
        o.axes.push({
          scale: "ms", side: 1, size: 64, stroke: "#0891b2", grid: { show: false },
          font: "11px " + getComputedStyle(document.body).fontFamily,
          values: function (u, splits) { return splits.map(function (v) { return fmtTick(v) + " ms"; }); }
        });
      }
    });
  }

  function eventLegend() {
    var box = document.getElementById("event-legend");
    if (!box || !MAJOR.length) return;
    var seen = {};
    MAJOR.forEach(function (ev) {
      if (seen[ev.type]) return;
      seen[ev.type] = true;
      var span = document.createElement("span");
      span.style.color = EVENT_COLORS[ev.type] || "#475569";
      span.appendChild(document.createElement("i"));
      span.appendChild(document.createTextNode(EVENT_LABELS[ev.type] || ev.type.replace(/_/g, " ")));
      box.appendChild(span);
    });
    if (MINOR.length) {
      var tick = document.createElement("span");
      tick.appendChild(document.createTextNode("▮ ticks on the time axis: scaling steps and worker starts (hover for details)"));
      box.appendChild(tick);
    }
  }

  function renderCharts() {
    expected = 5;
    usersChart();
    breakdownChart("rps", "rps", "group");
    select("rps", "throughput breakdown", breakdownOptions("rps"), function (v) { breakdownChart("rps", "rps", v); });
    var latencyOptions = [{ text: "whole run", value: "total" }];
    if (D.groups.length) {
      latencyOptions.push({
        group: "groups", items: D.groups.map(function (g, i) { return { text: g.group, value: "g:" + i }; })
      });
    }
    if (D.names.length) {
      latencyOptions.push({
        group: "names", items: D.names.map(function (n, i) { return { text: nameLabel(n), value: "n:" + i }; })
      });
    }
    latencyChart("total");
    select("latency", "latency of", latencyOptions, latencyChart);
    breakdownChart("errors", "errors", "group");
    select("errors", "errors breakdown", breakdownOptions("errors"), function (v) { breakdownChart("errors", "errors", v); });
    healthChart();
    eventLegend();
    if (window.ResizeObserver) {
      var ro = new ResizeObserver(function () {
        Object.keys(charts).forEach(function (k) {
          var c = charts[k];
          if (!c) return;
          var w = Math.max(280, c.root.parentNode.clientWidth);
          if (Math.abs(w - c.width) > 1) c.setSize({ width: w, height: c.height });
        });
      });
      Array.prototype.forEach.call(document.querySelectorAll(".chart"), function (el) { ro.observe(el); });
    }
  }

  // -- sortable tables ---------------------------------------------------------------------------
  function sortable(table) {
    var ths = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(ths, function (th, col) {
      function sort() {
        var numeric = th.dataset.sort === "num";
        var desc = th.getAttribute("aria-sort") === "ascending" || (!th.hasAttribute("aria-sort") && numeric);
        Array.prototype.forEach.call(ths, function (o) { o.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", desc ? "descending" : "ascending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var ca = a.cells[col], cb = b.cells[col];
          var r = numeric
            ? (parseFloat(ca.dataset.v) || 0) - (parseFloat(cb.dataset.v) || 0)
            : ca.textContent.localeCompare(cb.textContent);
          return desc ? -r : r;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
    });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), sortable);
  renderCharts();
})();
