// The relay's web page: plain JavaScript against the relay's JSON API, same origin.
//
// The admin token lives in sessionStorage only: never in a URL (it would reach logs
// and history), never in a cookie (the browser would send it by itself, inviting
// cross-site requests). Every request carries it as `Authorization: Bearer`. All
// data from the API is put into the page as text (textContent), never as markup.
"use strict";

const TOKEN_KEY = "sidecar.adminToken";
const POLL_MS = 2000;

const $ = (id) => document.getElementById(id);

// Seconds the relay's clock is ahead of this browser's, from the `Date` of its last
// answer, so "12 s ago" is measured on the relay's clock.
let skew = 0;

// ---- the API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(code ? `${code}: ${message}` : message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "", `the relay did not answer (${e.message})`);
  }
  const date = Date.parse(response.headers.get("Date") || "");
  if (!Number.isNaN(date)) skew = (date - Date.now()) / 1000;
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const code = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
    const message = data && typeof data.message === "string" ? data.message : response.statusText;
    throw new ApiError(response.status, code, message);
  }
  return data;
}

// ---- formatting ----------------------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function showError(id, error) {
  const node = $(id);
  if (error) {
    node.textContent = error.message || String(error);
    node.hidden = false;
  } else {
    node.textContent = "";
    node.hidden = true;
  }
}

function timestamp(secs) {
  if (secs === undefined || secs === null) return "never";
  return new Date(secs * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function ago(secs) {
  if (secs === undefined || secs === null) return "never";
  const d = Math.max(0, Math.round(Date.now() / 1000 + skew - secs));
  if (d < 60) return `${d} s ago`;
  if (d < 3600) return `${Math.floor(d / 60)} min ${d % 60} s ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ${Math.floor((d % 3600) / 60)} min ago`;
  return timestamp(secs);
}

function bytes(n) {
  const exact = `${Number(n).toLocaleString("en")} B`;
  if (n < 1024) return exact;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = -1;
  do {
    v /= 1024;
    i += 1;
  } while (v >= 1024 && i < units.length - 1);
  return `${exact} (${v.toFixed(1)} ${units[i]})`;
}

function bitRate(bitsPerSecond) {
  if (bitsPerSecond === null) return "…";
  const units = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
  let v = bitsPerSecond;
  let i = 0;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

function limitsText(limits) {
  if (!limits) return "";
  const bw = limits.bandwidth_mbps ? `${limits.bandwidth_mbps} Mbit/s` : "no cap";
  return `${limits.max_peers} peers, ${limits.max_ipv4} IPv4, ${bw}`;
}

function usageText(usage) {
  if (!usage) return "";
  return `${usage.peers} peers, ${usage.ipv4} IPv4`;
}

function optionalNumber(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

// ---- views ---------------------------------------------------------------------

let current = null;
let pollTimer = null;
// Bumped on every change of view: an answer that arrives for an earlier view (or
// after sign-out) is dropped instead of drawn or polled again.
let generation = 0;

function show(view) {
  current = view;
  generation += 1;
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== `view-${view}`;
  }
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === view);
  }
  $("nav").hidden = view === "signin";
  stopPolling();
  if (view === "peers") pollPeers();
  if (view === "tokens") loadTokens();
  if (view === "device") $("device-code").focus();
}

function signedIn() {
  return Boolean(sessionStorage.getItem(TOKEN_KEY));
}

// The view the address asks for: /device opens the approval view with ?code= filled in.
function initialView() {
  if (location.pathname === "/device") {
    const code = new URLSearchParams(location.search).get("code");
    if (code) $("device-code").value = code;
    return "device";
  }
  return "peers";
}

async function signIn(event) {
  event.preventDefault();
  const input = $("signin-token");
  const token = input.value.trim();
  showError("signin-error", null);
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    // Listing tokens needs the admin scope: the one check that this token can drive
    // the whole page.
    await api("GET", "/v1/admin/tokens");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    showError("signin-error", e);
    return;
  }
  input.value = "";
  show(initialView());
  if (current === "device" && $("device-code").value) lookUpDevice();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  previous.clear();
  $("peers-body").replaceChildren();
  $("tokens-body").replaceChildren();
  $("created-secret").textContent = "";
  $("created").hidden = true;
  $("device-request").hidden = true;
  $("device-result").hidden = true;
  show("signin");
}

// A request refused for the token itself (revoked, relay rebuilt) ends the session.
function handleAuth(error) {
  if (error instanceof ApiError && error.status === 401) {
    signOut();
    showError("signin-error", error);
    return true;
  }
  return false;
}

// ---- peers ---------------------------------------------------------------------

// Last counters seen per peer, to compute the rate from the change between polls.
const previous = new Map();

function stopPolling() {
  if (pollTimer !== null) {
    clearTimeout(pollTimer);
    pollTimer = null;
  }
}

async function pollPeers() {
  stopPolling();
  const gen = generation;
  try {
    const data = await api("GET", "/v1/peers");
    if (gen !== generation) return;
    showError("peers-error", null);
    renderPeers(data.peers || []);
    $("peers-updated").textContent = `Last update ${new Date().toLocaleTimeString("en-GB")}.`;
  } catch (e) {
    if (gen !== generation || handleAuth(e)) return;
    showError("peers-error", e);
  }
  if (current === "peers" && signedIn()) pollTimer = setTimeout(pollPeers, POLL_MS);
}

function renderPeers(peers) {
  const now = performance.now();
  const rows = [];
  const seen = new Set();
  for (const p of peers) {
    seen.add(p.pubkey);
    const before = previous.get(p.pubkey);
    let rateIn = null;
    let rateOut = null;
    if (before && now > before.at) {
      const dt = (now - before.at) / 1000;
      // A counter that went down (the peer re-registered) starts over.
      rateIn = Math.max(0, p.rx_bytes - before.rx) * 8 / dt;
      rateOut = Math.max(0, p.tx_bytes - before.tx) * 8 / dt;
    }
    previous.set(p.pubkey, { rx: p.rx_bytes, tx: p.tx_bytes, at: now });

    const tr = el("tr");
    tr.dataset.pubkey = p.pubkey;
    const addrs = el("td", null, "addrs");
    addrs.append(el("div", p.ipv6, "ipv6"));
    if (p.ipv4) addrs.append(el("div", p.ipv4, "ipv4"));
    addrs.append(el("div", p.pubkey, "pubkey muted"));
    tr.append(
      addrs,
      el("td", p.name || "", "name"),
      el("td", p.container ? p.container.slice(0, 12) : "", "container"),
      el("td", ago(p.last_handshake), "handshake"),
      el("td", bytes(p.rx_bytes), "rx"),
      el("td", bytes(p.tx_bytes), "tx"),
      el("td", `${bitRate(rateIn)} / ${bitRate(rateOut)}`, "rate"),
    );
    if (p.container) tr.children[2].title = p.container;
    rows.push(tr);
  }
  for (const key of [...previous.keys()]) {
    if (!seen.has(key)) previous.delete(key);
  }
  $("peers-body").replaceChildren(...rows);
  $("peers-empty").hidden = rows.length > 0;
}

// ---- tokens --------------------------------------------------------------------

async function loadTokens() {
  const gen = generation;
  try {
    const data = await api("GET", "/v1/admin/tokens");
    if (gen !== generation) return;
    showError("tokens-error", null);
    renderTokens(data.tokens || []);
  } catch (e) {
    if (handleAuth(e)) return;
    showError("tokens-error", e);
  }
}

function renderTokens(tokens) {
  // Scopes come with relays that have them; the column and the checkboxes appear
  // only then, so the page works with relays from before scopes as well.
  const scoped = tokens.some((t) => Array.isArray(t.scopes));
  $("tokens-table").classList.toggle("with-scopes", scoped);
  $("create-scopes").hidden = !scoped;
  const rows = tokens.map((t) => {
    const tr = el("tr");
    tr.dataset.id = t.id;
    // Relays without scopes mark admin tokens by this flag alone.
    const kind = t.admin && !scoped ? " (admin)" : "";
    const revoke = el("button", "Revoke", "danger revoke");
    revoke.type = "button";
    revoke.addEventListener("click", () => revokeToken(t, revoke));
    const actions = el("td", null, "actions");
    actions.append(revoke);
    tr.append(
      el("td", `${t.name}${kind}`, "name"),
      el("td", t.id, "id"),
      el("td", Array.isArray(t.scopes) ? t.scopes.join(" ") : "", "scopes-col scopes"),
      el("td", limitsText(t.limits), "limits"),
      el("td", usageText(t.usage), "usage"),
      el("td", timestamp(t.created), "created"),
      el("td", t.last_used ? ago(t.last_used) : "not since start", "last-used"),
      actions,
    );
    return tr;
  });
  $("tokens-body").replaceChildren(...rows);
}

// Two clicks: the first arms the button, the second revokes, so a stray click never
// takes a tenant's peers down.
async function revokeToken(token, button) {
  if (!button.classList.contains("armed")) {
    button.classList.add("armed");
    button.textContent = "Revoke with its peers?";
    return;
  }
  button.disabled = true;
  try {
    await api("DELETE", "/v1/admin/tokens", { id: token.id });
    showError("tokens-error", null);
  } catch (e) {
    if (handleAuth(e)) return;
    showError("tokens-error", e);
  }
  loadTokens();
}

async function createToken(event) {
  event.preventDefault();
  showError("create-error", null);
  const body = {
    name: $("create-name").value.trim(),
    max_peers: Number($("create-max-peers").value),
    max_ipv4: Number($("create-max-ipv4").value),
    isolate_peers: $("create-isolate").checked,
    bind_machine: $("create-bind").checked,
  };
  const bandwidth = optionalNumber("create-bandwidth");
  if (bandwidth !== undefined) body.bandwidth_mbps = bandwidth;
  if (!$("create-scopes").hidden) {
    body.scopes = [...document.querySelectorAll("#create-scopes input[name=scope]:checked")]
      .map((c) => c.value);
  }
  try {
    const created = await api("POST", "/v1/admin/tokens", body);
    $("created-name").textContent = body.name;
    $("created-id").textContent = created.id;
    $("created-secret").textContent = created.token;
    $("created").hidden = false;
    $("create-form").reset();
  } catch (e) {
    if (handleAuth(e)) return;
    showError("create-error", e);
  }
  loadTokens();
}

function dismissCreated() {
  $("created-secret").textContent = "";
  $("created").hidden = true;
}

// ---- device approval -----------------------------------------------------------

function deviceCode() {
  return $("device-code").value.trim().toUpperCase();
}

function devicePath(suffix) {
  return `/v1/admin/device/${encodeURIComponent(deviceCode())}${suffix}`;
}

// The login as the relay last described it (GET, approve and deny all answer it).
function renderDevice(login) {
  const scopes = Array.isArray(login.scopes) ? login.scopes.join(" ") : login.scope;
  $("device-show-code").textContent = login.user_code || deviceCode();
  $("device-scope").textContent = scopes || "(none)";
  $("device-state").textContent = login.state || "";
  $("device-source").textContent = login.source || "";
  $("device-created").textContent = timestamp(login.created);
  $("device-expires").textContent = timestamp(login.expires);
  // Only a pending login can still be decided.
  $("device-approve-form").hidden = login.state !== undefined && login.state !== "pending";
  $("device-request").hidden = false;
}

async function lookUpDevice(event) {
  if (event) event.preventDefault();
  showError("device-error", null);
  $("device-result").hidden = true;
  $("device-request").hidden = true;
  try {
    renderDevice(await api("GET", devicePath("")));
  } catch (e) {
    if (handleAuth(e)) return;
    showError("device-error", e);
  }
}

async function decideDevice(approve) {
  showError("device-error", null);
  $("device-result").hidden = true;
  // Every field is optional: what is left out comes from the relay's defaults, and
  // no field at all sends no body.
  let body;
  if (approve) {
    const fields = {
      name: $("device-name").value.trim() || undefined,
      max_peers: optionalNumber("device-max-peers"),
      max_ipv4: optionalNumber("device-max-ipv4"),
      bandwidth_mbps: optionalNumber("device-bandwidth"),
    };
    const given = Object.entries(fields).filter(([, v]) => v !== undefined);
    if (given.length) body = Object.fromEntries(given);
  }
  try {
    const login = await api("POST", devicePath(approve ? "/approve" : "/deny"), body);
    if (login) renderDevice(login);
    const code = (login && login.user_code) || deviceCode();
    const result = $("device-result");
    result.textContent = approve
      ? `Approved ${code}: the device receives its token at its next poll.`
      : `Denied ${code}: the device is told so at its next poll.`;
    result.hidden = false;
  } catch (e) {
    if (handleAuth(e)) return;
    showError("device-error", e);
  }
}

// ---- start ---------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  $("create-form").addEventListener("submit", createToken);
  $("created-dismiss").addEventListener("click", dismissCreated);
  $("device-form").addEventListener("submit", lookUpDevice);
  $("device-approve-form").addEventListener("submit", (e) => {
    e.preventDefault();
    decideDevice(true);
  });
  $("device-deny").addEventListener("click", () => decideDevice(false));
  if (signedIn()) {
    show(initialView());
    if (current === "device" && $("device-code").value) lookUpDevice();
  } else {
    initialView();
    show("signin");
  }
});
