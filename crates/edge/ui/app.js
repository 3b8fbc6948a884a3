// The edge's operator page: a chat playground over /v1/chat/completions and a live view of
// /v1/audit. Everything is drawn with textContent (no HTML from data); no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("ep-key") || "", model: "", auth: false, ready: false,
                history: [], busy: null, timer: null };

function bytes(n) {
  if (n == null) return "–";
  if (n < 1024) return n + " B";
  if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
  if (n < 1 << 30) return (n / (1 << 20)).toFixed(1) + " MiB";
  return (n / (1 << 30)).toFixed(2) + " GiB";
}
function ms(v) { return v == null ? "–" : (v < 10 ? v.toFixed(1) : Math.round(v)) + " ms"; }
function time(t) { return new Date(t).toLocaleTimeString(); }
// Content ids are 64 hex digits: shown by their first 12 (the full line is the title).
function shortIds(line) { return line.replace(/\b([0-9a-f]{12})[0-9a-f]{52}\b/g, "$1…"); }
function status(text) { $("status").textContent = text; }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    if (c instanceof Node) { const td = document.createElement("td"); td.append(c); tr.append(td); }
    else if (typeof c === "number") tr.append(el("td", c, "num"));
    else tr.append(el("td", c));
  }
  return tr;
}
function fill(tbody, rows, empty, span) {
  tbody.replaceChildren(...rows);
  if (!rows.length) { const tr = row([empty]); tr.firstChild.colSpan = span; tr.className = "muted"; tbody.append(tr); }
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  return fetch(path, Object.assign({}, opts, { headers }));
}
async function errorText(r) {
  try { const j = await r.json(); return (j.error && j.error.message) || r.statusText; }
  catch (_) { return r.status + " " + r.statusText; }
}

async function start() {
  let cfg;
  try { cfg = await (await fetch("/ui/config.json")).json(); }
  catch (e) { status("cannot reach the edge: " + e.message); return; }
  state.model = cfg.model_id;
  state.auth = cfg.auth_required;
  $("model").textContent = "model " + cfg.model_id + (cfg.cloud ? " · with a cloud" : " · no cloud") +
    (cfg.auth_required ? " · API keys required" : "");
  $("apikey").value = state.key;
  if (!state.auth || state.key) await connect();
  else { status("Enter your API key to see your requests and chat."); $("apikey").focus(); }
}

async function connect() {
  const r = await api("/v1/audit");
  if (!r.ok) { state.ready = false; status("the edge refused the key: " + await errorText(r)); return; }
  state.ready = true;
  status(state.auth ? "key accepted" : "ready");
  draw(await r.json());
  await lists();
  if (!state.timer) {
    let tick = 0;
    state.timer = setInterval(() => {
      if (document.hidden) return;
      refresh();
      if (++tick % 10 === 0) lists();
    }, 1000);
  }
}

async function lists() {
  const [m, e] = await Promise.all([api("/v1/models"), api("/v1/edge-prompts")]);
  const pick = (sel, names) => {
    const cur = sel.value;
    sel.replaceChildren(el("option", "(none)"));
    sel.firstChild.value = "";
    for (const n of names) { const o = el("option", n); o.value = n; sel.append(o); }
    if (names.includes(cur)) sel.value = cur;
  };
  if (m.ok) {
    const prefix = state.model + ":";
    pick($("cloud"), (await m.json()).data.map((d) => d.id).filter((id) => id.startsWith(prefix))
      .map((id) => id.slice(prefix.length)));
  }
  if (e.ok) pick($("edge"), (await e.json()).data.map((d) => d.name));
}

async function refresh() {
  if (!state.ready) return;
  try {
    const r = await api("/v1/audit");
    if (r.ok) draw(await r.json());
  } catch (_) { status("the edge is not answering"); }
}

function draw(a) {
  $("tenant").textContent = "· tenant " + a.tenant;
  fill($("requests").tBodies[0], a.requests.map((q) => {
    const up = document.createElement("div");
    up.append(el("span", q.upstream.length + " req · ↑" + bytes(q.upstream_bytes_up) + " ↓" + bytes(q.upstream_bytes_down)));
    if (q.upstream.length) {
      const list = el("ol", null, "mono small");
      for (const u of q.upstream) {
        const li = el("li", shortIds(u.line) + " → " + u.status);
        li.title = u.line;
        list.append(li);
      }
      up.append(list);
    }
    const text = el("span", bytes(q.text_bytes_up), q.text_bytes_up === 0 ? "zero" : "leak");
    const names = (q.cloud_prompt || "–") + " / " + (q.edge_prompt || "–") + (q.kv ? " (" + q.kv + ")" : "");
    const tr = row([time(q.at_ms), names, q.status + " " + q.outcome, text,
      q.prompt_tokens + ": " + q.cached_tokens + " / " + q.computed_tokens, ms(q.ttft_ms), up]);
    tr.dataset.id = q.id;
    tr.children[3].className = "textup";
    return tr;
  }), "no requests yet", 7);
  fill($("prompts").tBodies[0], a.cloud_prompts.map((p) => row([p.name + " v" + p.version, p.tokens, p.codec,
    p.strategy, bytes(p.kv_bytes), p.frames ? p.frames_written + "/" + p.frames + (p.done ? "" : " …") : "–",
    p.pinned ? "yes" : "no"])), a.cloud ? "none held yet" : "this edge has no cloud", 7);
  const kv = a.kv_memory;
  $("kvmeter").max = Math.max(1, kv.budget_bytes);
  $("kvmeter").value = kv.used_bytes;
  $("kvtext").textContent = bytes(kv.used_bytes) + " of " + bytes(kv.budget_bytes) + " · " + kv.cached_blocks +
    " cached blocks · " + kv.running + " running, " + kv.waiting + " waiting";
  $("link").textContent = a.link
    ? "RTT " + ms(a.link.rtt_ms) + " · " + a.link.mbit_per_s.toFixed(1) + " Mbit/s (" + a.link.rtt_samples +
      " RTT and " + a.link.rate_samples + " rate samples)" + (a.planner_ready ? " · planner ready" : "")
    : (a.cloud ? "not measured yet" : "no cloud");
  const counts = a.decision_counts.map((c) => c.strategy + " × " + c.count).join(", ");
  if (counts) $("link").textContent += " · decisions: " + counts;
  fill($("decisions").tBodies[0], a.decisions.slice().reverse().map((d) => row([d.name, d.tokens,
    d.strategy + (d.split_from != null ? " @" + d.split_from : ""), d.expected_ms > 0 ? ms(d.expected_ms) : "–", d.reason])),
    "none yet (a fixed strategy, or nothing fetched)", 5);
  if (a.upstream) {
    const u = a.upstream;
    $("traffic").textContent = u.requests + " requests · ↑" + bytes(u.bytes_up) + " · ↓" + bytes(u.bytes_down) +
      " (" + bytes(u.kv_bytes) + " of KV)";
    $("recent").replaceChildren(...u.recent.slice().reverse().map((x) =>
      el("li", time(x.at_ms) + "  " + shortIds(x.line) + " → " + x.status + "  ↑" + bytes(x.bytes_up) + " ↓" + bytes(x.bytes_down))));
  } else $("traffic").textContent = "this edge has no cloud: nothing is ever sent";
}

function say(role, text) {
  const li = el("li", null, role);
  li.append(el("span", role, "who"));
  const body = el("span", text);
  li.append(body);
  $("log").append(li);
  li.scrollIntoView({ block: "nearest" });
  return { li, body };
}

function num(id) { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); }

async function send(ev) {
  ev.preventDefault();
  const text = $("message").value;
  if (!text.trim() || state.busy) return;
  if (!state.ready) { status("Enter your API key first."); $("apikey").focus(); return; }
  const cloud = $("cloud").value, edge = $("edge").value;
  const body = { model: cloud ? state.model + ":" + cloud : state.model,
    messages: state.history.concat([{ role: "user", content: text }]),
    stream: true, stream_options: { include_usage: true },
    temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens"), seed: num("seed") };
  if (edge) body.edge_prompt = edge;
  say("user", text);
  $("message").value = "";
  const out = say("assistant", "");
  const ctl = new AbortController();
  state.busy = ctl;
  $("stop").disabled = false; $("sendbtn").disabled = true;
  let answer = "";
  try {
    const r = await api("/v1/chat/completions", { method: "POST", signal: ctl.signal,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          if (j.id) out.li.dataset.id = j.id;
          const c = j.choices && j.choices[0];
          if (c && c.delta && c.delta.content) { answer += c.delta.content; out.body.textContent = answer; }
          if (c && c.finish_reason) out.li.dataset.finish = c.finish_reason;
          if (j.usage) out.li.dataset.cached = j.usage.prompt_tokens_details.cached_tokens;
        }
      }
    }
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  } catch (e) {
    out.li.className = "error";
    out.body.textContent = (answer ? answer + "\n" : "") + (e.name === "AbortError" ? "(stopped)" : "error: " + e.message);
  } finally {
    out.li.dataset.done = "1";
    state.busy = null;
    $("stop").disabled = true; $("sendbtn").disabled = false;
    $("message").focus();
    refresh();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("apikey").value.trim();
    sessionStorage.setItem("ep-key", state.key);
    connect();
  });
  $("send").addEventListener("submit", send);
  $("message").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) send(ev);
  });
  $("stop").addEventListener("click", () => state.busy && state.busy.abort());
  $("clear").addEventListener("click", () => { state.history = []; $("log").replaceChildren(); $("message").focus(); });
  start();
});
