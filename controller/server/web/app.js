// The geomx dashboard: the cluster and jobs (#/) and a job's page (#/jobs/NAME), from the
// controller's JSON API (/api/...; the same JSON as `geomxctl --output json`). A job page
// follows its job by server-sent events (/api/jobs/NAME/stream) and draws the training
// curves with uPlot. Every element is built with textContent: nothing the cluster reports
// is ever parsed as HTML.
"use strict";

const view = () => document.getElementById("view");
let teardown = () => {};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// replaceChildren without the absent (null, false) parts
function put(box, ...kids) {
  box.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
}

async function api(path) {
  const res = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (res.status === 401) {
    location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function age(ms) {
  if (!ms) return "-";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}

function time(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 23) : "-";
}

function table(headers, rows, cls) {
  return el("table", { class: cls },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function phaseBadge(phase) {
  return el("span", { class: "badge phase-" + String(phase).toLowerCase() }, phase);
}

// ---------------------------------------------------------------- cluster and jobs

async function showOverview() {
  let timer = null;
  let stopped = false;
  teardown = () => { stopped = true; clearTimeout(timer); };
  const refresh = async () => {
    try {
      const [cluster, jobs] = await Promise.all([api("/api/cluster"), api("/api/jobs")]);
      if (stopped) return;
      view().replaceChildren(renderCluster(cluster), renderJobs(jobs.jobs));
    } catch (e) {
      if (!stopped) view().replaceChildren(el("p", { class: "error" }, "Cannot load: " + e.message));
    }
    if (!stopped) timer = setTimeout(refresh, 2000);
  };
  await refresh();
}

function renderCluster(cluster) {
  const byName = new Map(cluster.hosts.map((h) => [h.name, h]));
  const sites = cluster.sites.map((s, i) =>
    el("section", { class: "site", "data-site": s.network },
      el("h3", {}, "Data center " + (i + 1), el("span", { class: "muted" }, " " + s.network)),
      table(["host", "underlay", "subnet", "state", "heartbeat", "agent", "containers", "network"],
        s.hosts.map((n) => byName.get(n)).filter(Boolean).map((h) =>
          el("tr", { class: "host host-" + h.state, "data-host": h.name },
            el("td", {}, h.name, h.cordoned ? el("span", { class: "badge" }, "cordoned") : null),
            el("td", {}, h.underlay_ip),
            el("td", {}, h.subnet || "-"),
            el("td", {}, el("span", { class: "badge state-" + h.state }, h.state)),
            el("td", {}, age(h.heartbeat_age_ms)),
            el("td", {}, h.agent_version),
            el("td", {}, String(h.containers)),
            el("td", {}, h.network_converged ? "converged" : (h.network_error || "converging")))))));
  return el("section", { id: "cluster" },
    el("h2", {}, "Cluster"),
    el("div", { class: "sites" }, sites),
    renderLinks(cluster.hosts));
}

function renderLinks(hosts) {
  const names = hosts.map((h) => h.name);
  if (!hosts.some((h) => h.links && h.links.length)) {
    return el("p", { class: "muted" }, "No link measurements yet.");
  }
  const rows = hosts.map((h) => {
    const links = new Map((h.links || []).map((l) => [l.peer, l]));
    return el("tr", {}, el("th", {}, h.name), names.map((p) => {
      if (p === h.name) return el("td", { class: "self" }, "·");
      const l = links.get(p);
      if (!l) return el("td", { class: "muted" }, "-");
      const bad = l.loss_pct >= 50 || l.rtt_ms === 0;
      return el("td", { class: bad ? "link bad" : "link", title: l.backend },
        l.rtt_ms ? l.rtt_ms.toFixed(1) + " ms" : "no answer",
        el("br"), el("small", {}, l.loss_pct.toFixed(1) + "% loss · " + l.backend));
    }));
  });
  return el("section", { id: "links" },
    el("h3", {}, "Links (round trip, loss, backend; row: measured from)"),
    table(["from \\ to", ...names], rows, "matrix"));
}

function renderJobs(jobs) {
  const now = Date.now();
  return el("section", { id: "jobs" },
    el("h2", {}, "Jobs"),
    jobs.length === 0 ? el("p", { class: "muted" }, "No jobs yet: geomxctl submit job.toml") :
      table(["job", "mode", "phase", "nodes", "restarts", "age", "reason"], jobs.map((j) =>
        el("tr", { "data-job": j.name },
          el("td", {}, el("a", { href: "#/jobs/" + encodeURIComponent(j.name) }, j.name)),
          el("td", {}, j.mode),
          el("td", {}, phaseBadge(j.phase)),
          el("td", {}, j.running_nodes + "/" + j.node_count),
          el("td", {}, j.restarts + "/" + j.max_restarts),
          el("td", {}, age(now - j.submitted_at_ms)),
          el("td", { class: "reason" }, (j.reason || "").split("\n")[0])))));
}

// ---------------------------------------------------------------- a job

// A node failed: it ended badly and the controller did not call it harmless.
function nodeFailed(n) {
  if (nodeHarmless(n)) return false;
  if (n.state === "failed" || n.state === "missing") return true;
  return n.exit_code !== null && n.exit_code !== undefined && n.exit_code !== 0;
}

// Harmless: a crash of a scheduler or server in ps::Finalize after training finished.
function nodeHarmless(n) {
  return /\(not a failure\)/.test(n.end || "");
}

function nodeClass(n) {
  if (nodeFailed(n)) return "failed";
  if (nodeHarmless(n)) return "shutdown-crash";
  return n.state;
}

function nodeReason(n) {
  if (n.error) return n.error;
  if (n.end) return n.end;
  if (n.exit_code !== null && n.exit_code !== undefined) return "exited " + n.exit_code;
  return "";
}

function nodeBox(n, onPick) {
  const failed = nodeFailed(n);
  return el("div", {
    class: "node node-" + nodeClass(n) + " role-" + n.role,
    "data-node": n.name, "data-state": nodeClass(n), "data-host": n.host,
    title: nodeReason(n) || n.state, tabindex: 0,
    onclick: () => onPick(n.name),
    onkeydown: (e) => { if (e.key === "Enter") onPick(n.name); },
  },
  el("div", { class: "node-name" }, n.name),
  el("div", { class: "node-meta" }, n.role.replace("_", " ") + " · " + n.host + (n.ip ? " · " + n.ip : "")),
  el("div", { class: "node-state" }, failed ? "failed" : nodeHarmless(n) ? n.end : n.state,
    n.progress && n.progress.iteration ? " · it " + n.progress.iteration : "",
    n.progress && n.progress.accuracy != null ? " · acc " + n.progress.accuracy.toFixed(3) : ""),
  failed ? el("div", { class: "node-reason" }, nodeReason(n)) : null);
}

// The HiPS hierarchy: the global tier (global scheduler and servers, the central party's
// nodes), under it every party with its scheduler, servers and workers.
function renderTopology(job, onPick) {
  const nodes = job.nodes || [];
  const global = nodes.filter((n) => n.role.startsWith("global_"));
  const central = nodes.filter((n) => n.party === "central" && !n.role.startsWith("global_"));
  const parties = [...new Set(nodes.filter((n) => n.party !== "central" && !n.role.startsWith("global_")).map((n) => n.party))];
  const tier = (label, list) => list.length ? el("div", { class: "tier" },
    el("div", { class: "tier-label" }, label), el("div", { class: "tier-nodes" }, list.map((n) => nodeBox(n, onPick)))) : null;
  const partyBox = (name, list) => el("div", { class: "party", "data-party": name },
    el("h4", {}, "party " + name),
    tier("scheduler", list.filter((n) => n.role === "scheduler")),
    tier("servers", list.filter((n) => n.role === "server")),
    tier("workers", list.filter((n) => n.role === "worker" || n.role === "master_worker")));
  const top = (global.length || central.length) ? el("div", { class: "global" },
    el("h4", {}, "global tier (central party)"),
    tier("global scheduler", global.filter((n) => n.role === "global_scheduler")),
    tier("global servers", global.filter((n) => n.role === "global_server")),
    central.length ? partyBox("central", central) : null) : null;
  return el("div", { class: "topology", "data-mode": job.mode },
    top,
    top ? el("div", { class: "connector" }) : null,
    el("div", { class: "parties" }, parties.map((p) => partyBox(p, nodes.filter((n) => n.party === p && !n.role.startsWith("global_"))))));
}

function renderRendezvous(job) {
  const r = job.rendezvous || [];
  if (!r.length) return el("p", { class: "muted" }, "No rendezvous to follow (not starting or running).");
  return el("ul", { class: "rendezvous" }, r.map((x) =>
    el("li", { class: x.complete ? "complete" : "waiting" }, x.summary)));
}

function renderEvents(events) {
  return table(["time (UTC)", "kind", "gen", "node", "host", "message"], events.slice().reverse().map((e) =>
    el("tr", { class: "event kind-" + e.kind },
      el("td", {}, time(e.at_ms)), el("td", {}, e.kind), el("td", {}, String(e.generation)),
      el("td", {}, e.node || "-"), el("td", {}, e.host || "-"),
      el("td", { class: "message" }, e.message))), "events");
}

// Curves: one line per worker (label party/node), accuracy and iteration over time.
class Curves {
  constructor(box) {
    this.box = box;
    this.series = new Map(); // node -> {party, t: [], acc: [], it: []}
    this.charts = [];
    this.count = 0;
  }
  add(points) {
    for (const p of points) {
      let s = this.series.get(p.node);
      if (!s) { s = { party: p.party, t: [], acc: [], it: [] }; this.series.set(p.node, s); }
      s.t.push(p.t_ms / 1000); s.acc.push(p.accuracy ?? null); s.it.push(p.iteration);
      this.count++;
    }
    this.draw();
  }
  data(key) {
    const names = this.sortedNames();
    const times = [...new Set(names.flatMap((n) => this.series.get(n).t))].sort((a, b) => a - b);
    const index = new Map(times.map((t, i) => [t, i]));
    const cols = names.map((n) => {
      const s = this.series.get(n);
      const col = new Array(times.length).fill(null);
      s.t.forEach((t, i) => { col[index.get(t)] = s[key][i]; });
      return col;
    });
    return [times, ...cols];
  }
  sortedNames() {
    return [...this.series.keys()].sort((a, b) => {
      const pa = this.series.get(a).party, pb = this.series.get(b).party;
      return pa === pb ? a.localeCompare(b) : pa.localeCompare(pb);
    });
  }
  draw() {
    this.box.dataset.points = String(this.count);
    const names = this.sortedNames();
    if (!names.length) {
      this.box.replaceChildren(el("p", { class: "muted" }, "No training progress reported yet."));
      return;
    }
    const key = names.join(",");
    if (this.key !== key || typeof uPlot === "undefined") {
      this.key = key;
      this.charts.forEach((c) => c.destroy());
      this.charts = [];
      this.box.replaceChildren();
      const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
      const width = Math.max(320, Math.min(this.box.clientWidth || 900, 1200) / 2 - 24);
      for (const [field, title] of [["acc", "test accuracy"], ["it", "iteration"]]) {
        const holder = el("div", { class: "chart", "data-chart": field });
        this.box.append(holder);
        const series = [{}].concat(names.map((n, i) => ({
          label: this.series.get(n).party + "/" + n,
          stroke: palette[i % palette.length], width: 2, spanGaps: true,
        })));
        this.charts.push(new uPlot({
          title, width, height: 260, series,
          scales: { x: { time: true } },
          axes: [{}, { label: title }],
        }, this.data(field), holder));
      }
    } else {
      this.charts[0].setData(this.data("acc"));
      this.charts[1].setData(this.data("it"));
    }
  }
}

async function showLogs(panel, job, node) {
  panel.replaceChildren(el("h3", {}, "Output of " + node), el("p", { class: "muted" }, "Loading…"));
  try {
    const r = await api("/api/jobs/" + encodeURIComponent(job) + "/logs/" + encodeURIComponent(node) + "?tail=200");
    panel.replaceChildren(el("h3", {}, "Output of " + node + " (last " + r.lines.length + " lines)"),
      el("pre", { class: "logs", "data-node": node }, r.lines.map((l) =>
        el("span", { class: l.stderr ? "stderr" : "stdout" }, l.text + "\n"))));
  } catch (e) {
    panel.replaceChildren(el("h3", {}, "Output of " + node), el("p", { class: "error" }, e.message));
  }
}

async function showJob(name) {
  let source = null;
  teardown = () => { if (source) source.close(); };
  const first = await api("/api/jobs/" + encodeURIComponent(name));
  const header = el("section", { id: "job-header" });
  const topo = el("section", { id: "topology" });
  const rdv = el("section", { id: "rendezvous" });
  const curvesBox = el("div", { class: "curves", id: "curves" });
  const events = el("section", { id: "events" });
  const logs = el("section", { id: "logs" }, el("p", { class: "muted" }, "Pick a node to see its output."));
  const curves = new Curves(curvesBox);
  const pick = (node) => showLogs(logs, name, node);
  const render = (job, evs) => {
    put(header,
      el("h2", {}, job.name, " ", phaseBadge(job.phase)),
      el("p", {}, "mode " + job.mode + " · image " + job.image + " · generation " + job.generation +
        " · restarts " + job.restarts + "/" + job.max_restarts + " · nodes running " + job.running_nodes + "/" + job.node_count),
      job.reason ? el("pre", { class: "reason" }, job.reason) : null);
    topo.replaceChildren(el("h3", {}, "Topology"), renderTopology(job, pick));
    rdv.replaceChildren(el("h3", {}, "Rendezvous"), renderRendezvous(job));
    events.replaceChildren(el("h3", {}, "Events"), renderEvents(evs));
  };
  render(first.job, first.events);
  put(view(), header, topo, rdv,
    el("section", { id: "training" }, el("h3", {}, "Training"), curvesBox), events, logs);
  curves.add(first.points);
  source = new EventSource("/api/jobs/" + encodeURIComponent(name) + "/stream?after=" + first.seq);
  let updates = 0;
  source.addEventListener("job", (e) => {
    const m = JSON.parse(e.data);
    render(m.job, m.events);
    view().dataset.updates = String(++updates);
  });
  window.__jobStream = source;
  source.addEventListener("points", (e) => curves.add(JSON.parse(e.data).points));
}

function route() {
  teardown();
  teardown = () => {};
  const m = location.hash.match(/^#\/jobs\/([^/]+)$/);
  const shown = m ? showJob(decodeURIComponent(m[1])) : showOverview();
  shown.catch((e) => view().replaceChildren(el("p", { class: "error" }, "Cannot load: " + e.message)));
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", route);
