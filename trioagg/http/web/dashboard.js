// The dashboard page: its controls, the page's address and the API, wired together.
// Every text that comes from the store (keys, tag values) is set as text, never as HTML.

import { apiKey, curlCommand, getJSON, setApiKey } from "./api.js";
import { chartConfig, formatNumber, uPlot } from "./chart.js";
import * as S from "./state.js";

const $ = (id) => document.getElementById(id);
const KEYS_PAGE = 50;
const TOP_LIMIT = 10;
const HEALTH_EVERY_MS = 5000;
const CHART_HEIGHT = 380;

let state = S.readState(location.search);
let server = null; // the last /v1/status answer
let previousStatus = null;
let keysPage = { items: [], next: null };
let keyInfo = null; // the chosen key's /v1/keys entry, null when it has none
let tiers = []; // the store's tiers (/v1/keys), finest first; none without --tiers
const seenValues = new Map(); // tag name -> values seen in group_by answers
const errors = new Map(); // what was asked -> its ApiError
const inflight = new Map(); // what is being asked -> its AbortController
let chart = null;
let chartSignature = "";
let drawn = null; // what the chart shows: { key, from, to (seconds), empty }
let zoomed = false;
let liveTimer = null;

/** What the page shows, for people reading it in the console (and for the tests). */
window.dashboard = {
  get state() { return state; },
  get chart() { return chart; },
  answer: null,
  request: null,
  loads: 0,
};

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

const timeFormats = new Map();
function formatTime(seconds) {
  let format = timeFormats.get(state.tz);
  if (!format) {
    const options = { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" };
    try {
      format = new Intl.DateTimeFormat("sv-SE", { ...options, timeZone: state.tz });
    } catch {
      format = new Intl.DateTimeFormat("sv-SE", { ...options, timeZone: "UTC" });
    }
    timeFormats.set(state.tz, format);
  }
  return format.format(new Date(seconds * 1000));
}

const parseStart = (text) => Date.parse(text) / 1000;

/** Ask for `path`, cancelling what `channel` asked before: only the latest answer counts. */
async function ask(channel, path, params) {
  inflight.get(channel)?.abort();
  const controller = new AbortController();
  inflight.set(channel, controller);
  try {
    return await getJSON(path, params, controller.signal);
  } finally {
    if (inflight.get(channel) === controller) inflight.delete(channel);
  }
}

// ---- state ------------------------------------------------------------------------------

function update(changes) {
  const before = state;
  state = { ...state, ...changes };
  if (state.groupBy) state.stats = S.oneStat(state.stats);
  history.replaceState(null, "", `?${S.writeState(state)}`);
  const changed = (...names) => names.some((name) => JSON.stringify(before[name]) !== JSON.stringify(state[name]));
  syncControls();
  if (changed("prefix")) loadKeys(false);
  if (changed("key")) loadKeyInfo();
  if (changed("key", "range", "from", "to", "granularity", "tz", "fill", "stats", "groupBy", "tags")) loadChart();
  if (changed("range", "from", "to", "top", "prefix")) loadTop();
  if (changed("tz")) {
    renderKeys();
    renderKeyMeta();
  }
  if (changed("live")) scheduleLive();
}

function selectKey(key) {
  if (key === state.key) return;
  const keeps = S.keepsQuantiles(key, server?.quantiles ?? []);
  let stats = keeps ? state.stats : state.stats.filter((name) => S.CHECKED_STATS.includes(name));
  if (!stats.length) stats = ["count"];
  update({ key, stats, groupBy: "", tags: [] });
}

/** The stats the controls choose; grouped, the one choice just made (`changed`). */
function statsFromControls(changed) {
  const typed = $("percentiles").value.split(",").map((name) => name.trim()).filter(Boolean);
  if (state.groupBy) {
    const chosen = changed.dataset.stat?.split(",") ?? typed.slice(0, 1);
    return chosen.length ? chosen : state.stats;
  }
  const stats = [];
  for (const box of document.querySelectorAll("[data-stat]")) {
    if (box.checked) stats.push(...box.dataset.stat.split(","));
  }
  const all = [...new Set([...stats, ...typed])];
  return all.length ? all : ["count"];
}

// ---- controls -----------------------------------------------------------------------------

function syncControls() {
  if (document.activeElement !== $("search")) $("search").value = state.prefix;
  for (const button of document.querySelectorAll("[data-range]")) {
    button.setAttribute("aria-pressed", String(button.dataset.range === state.range));
  }
  $("custom").hidden = state.range !== "custom";
  if (state.range === "custom") {
    $("from").value = state.from;
    $("to").value = state.to;
  }
  $("granularity").value = state.granularity;
  $("tz").value = state.tz;
  $("fill").value = state.fill;
  const covered = new Set();
  // grouped, the stats are a choice of one: radio buttons say so
  $("one-stat").hidden = !state.groupBy;
  for (const box of document.querySelectorAll("[data-stat]")) {
    box.type = state.groupBy ? "radio" : "checkbox";
    const names = box.dataset.stat.split(",");
    box.checked = names.every((name) => state.stats.includes(name));
    if (box.checked) names.forEach((name) => covered.add(name));
  }
  $("percentiles").value = state.stats.filter((name) => !covered.has(name)).join(",");
  $("top-stat").value = state.top;
  $("live").value = String(state.live);
  if ($("live").value !== String(state.live)) {
    $("live").append(el("option", { value: String(state.live), textContent: `every ${state.live} s` }));
    $("live").value = String(state.live);
  }
  renderKeyMeta();
  renderFilters();
}

function renderKeyMeta() {
  $("key-title").textContent = state.key || "Pick a key";
  let meta = "";
  if (keyInfo) {
    const tags = keyInfo.tags.length ? `tags ${keyInfo.tags.join(", ")}` : "no tags";
    meta = `${formatNumber(keyInfo.series)} series · ${tags} · ${formatTime(parseStart(keyInfo.first))} → ${formatTime(parseStart(keyInfo.last))}`;
  } else if (state.key) {
    meta = "no events stored under this key";
  }
  $("key-meta").textContent = meta;
  const tags = [...new Set([...(keyInfo?.tags ?? []), ...(state.groupBy ? [state.groupBy] : [])])];
  const groupOptions = [el("option", { value: "", textContent: "—" }), ...tags.map((name) => el("option", { value: name, textContent: name }))];
  $("group-by").replaceChildren(...groupOptions);
  $("group-by").value = state.groupBy;
  const filterTag = $("filter-tag").value;
  $("filter-tag").replaceChildren(...(keyInfo?.tags ?? []).map((name) => el("option", { value: name, textContent: name })));
  if ((keyInfo?.tags ?? []).includes(filterTag)) $("filter-tag").value = filterTag;
  const tagless = state.key !== "" && !(keyInfo?.tags.length);
  $("no-tags").hidden = !tagless;
  for (const id of ["group-by", "filter-tag", "filter-value", "add-filter"]) $(id).disabled = tagless && !state.groupBy;
  renderFilterValues();
  const keeps = S.keepsQuantiles(state.key, server?.quantiles ?? []);
  $("percentiles").disabled = !keeps && !$("percentiles").value;
  $("quantiles-note").hidden = keeps || !state.key;
}

function renderFilterValues() {
  const values = seenValues.get($("filter-tag").value) ?? new Set();
  $("filter-values").replaceChildren(...[...values].sort().map((value) => el("option", { value })));
}

function renderFilters() {
  $("filters").replaceChildren(
    ...state.tags.map(([name, value]) =>
      el(
        "span",
        { className: "chip" },
        `${name} = ${value}`,
        el("button", { type: "button", className: "remove", title: `Remove the filter on ${name}`, textContent: "×", onclick: () => update({ tags: state.tags.filter(([other]) => other !== name) }) }),
      ),
    ),
  );
}

function addFilter() {
  const name = $("filter-tag").value;
  const value = $("filter-value").value;
  if (!name || !value) return;
  $("filter-value").value = "";
  update({ tags: [...state.tags.filter(([other]) => other !== name), [name, value]] });
}

function renderErrors() {
  const shown = new Map();
  for (const error of errors.values()) {
    shown.set(JSON.stringify([error.code, error.message, error.details]), error);
  }
  const first = [...shown.values()][0];
  $("error").hidden = !first;
  if (!first) return;
  $("error-title").textContent =
    first.status === 0 ? "trioagg cannot be reached" : `The API answered ${first.status} ${first.code}`;
  $("error-message").textContent =
    first.status === 401 ? `${first.message} (type a key with the read scope in the API key field above)` : first.message;
  $("error-details").replaceChildren(
    ...[...shown.values()].flatMap((error) =>
      error.details.map((detail) =>
        el("li", {}, el("code", { textContent: String(detail.parameter ?? detail.field ?? "") }), ` ${String(detail.message ?? "")}`),
      ),
    ),
  );
}

function setError(channel, error) {
  if (error) errors.set(channel, error);
  else errors.delete(channel);
  renderErrors();
}

// ---- keys and top -----------------------------------------------------------------------

async function loadKeys(more) {
  const params = [["prefix", state.prefix], ["limit", String(KEYS_PAGE)]];
  if (more && keysPage.next !== null) params.push(["after", keysPage.next]);
  try {
    const page = await ask("keys", "v1/keys", params);
    keysPage = { items: more ? [...keysPage.items, ...page.keys] : page.keys, next: page.next };
    tiers = page.tiers ?? [];
    renderTiers();
    setError("keys", null);
  } catch (error) {
    if (error.name === "AbortError") return;
    if (!more) keysPage = { items: [], next: null };
    setError("keys", error);
  }
  renderKeys();
}

function renderKeys() {
  $("keys").replaceChildren(
    ...keysPage.items.map((info) => {
      const tags = info.tags.map((name) => el("span", { className: "tag", textContent: name }));
      const button = el(
        "button",
        { type: "button", className: "key" },
        el("span", { className: "name", textContent: info.key }),
        el("span", { className: "meta" }, ...tags, el("span", { textContent: `${formatNumber(info.series)} series · last ${formatTime(parseStart(info.last))}` })),
      );
      button.dataset.key = info.key;
      if (info.key === state.key) button.setAttribute("aria-current", "true");
      return el("li", {}, button);
    }),
  );
  $("keys-empty").hidden = keysPage.items.length > 0 || errors.has("keys");
  $("more-keys").hidden = keysPage.next === null;
}

function renderTiers() {
  $("tiers-box").hidden = tiers.length === 0;
  $("tiers").replaceChildren(
    ...tiers.map((tier, index) => {
      const next = index + 1 < tiers.length ? `, then merged into ${tiers[index + 1].width} buckets` : tier.horizon === "forever" ? "" : ", then deleted";
      const kept = tier.horizon === "forever" ? "for ever" : `for ${tier.horizon}`;
      return el("li", { textContent: S.tierText(tier), title: `${tier.width} buckets kept ${kept}${next}` });
    }),
  );
}

async function loadTop() {
  const range = S.resolveRange(state, Date.now() / 1000);
  const params = [["from", range.from], ["to", range.to], ["stat", state.top], ["limit", String(TOP_LIMIT)]];
  if (state.prefix) params.push(["prefix", state.prefix]);
  let results = [];
  try {
    results = (await ask("top", "v1/top", params)).results;
    setError("top", null);
  } catch (error) {
    if (error.name === "AbortError") return;
    setError("top", error);
  }
  const most = Math.max(...results.map((item) => Math.abs(item[state.top])), 0) || 1;
  $("top").replaceChildren(
    ...results.map((item) => {
      const bar = el("span", { className: "meter" });
      bar.style.width = `${(100 * Math.abs(item[state.top])) / most}%`;
      const button = el(
        "button",
        { type: "button", className: "key" },
        el("span", { className: "name", textContent: item.key }),
        el("span", { className: "value", textContent: formatNumber(item[state.top]) }),
        bar,
      );
      button.dataset.key = item.key;
      if (item.key === state.key) button.setAttribute("aria-current", "true");
      return el("li", {}, button);
    }),
  );
  $("top-empty").hidden = results.length > 0 || errors.has("top");
}

async function loadKeyInfo() {
  keyInfo = keysPage.items.find((info) => info.key === state.key) ?? null;
  renderKeyMeta();
  if (keyInfo || !state.key) return;
  try {
    const page = await ask("key", "v1/keys", [["prefix", state.key], ["limit", "1"]]);
    keyInfo = page.keys[0]?.key === state.key ? page.keys[0] : null;
    setError("key", null);
  } catch (error) {
    if (error.name === "AbortError") return;
    setError("key", error);
  }
  renderKeyMeta();
  renderEmpty();
}

// ---- the chart --------------------------------------------------------------------------

async function loadChart() {
  if (!state.key) {
    dropChart();
    $("curl").textContent = "";
    $("summary").textContent = "";
    showEmpty("Pick a key on the left, or from the top of the range, to chart it.");
    return;
  }
  const bucket = server?.bucket_seconds ?? 3600;
  const now = Date.now() / 1000;
  const range = S.resolveRange(state, now);
  // the tiers the range reaches: auto asks for buckets every one of them can answer
  const reached = S.tiersReached(tiers, S.rangeAge(range, now));
  const granularity = S.chooseGranularity(state, range.span, bucket, reached);
  const params = S.aggregateParams(state, range, granularity);
  $("curl").textContent = curlCommand("v1/aggregates", params);
  document.body.setAttribute("aria-busy", "true");
  try {
    const answer = await ask("chart", "v1/aggregates", params);
    setError("chart", null);
    window.dashboard.answer = answer;
    window.dashboard.request = params;
    drawChart(answer, S.bucketWidth(granularity, bucket), reached);
    rememberValues(answer);
  } catch (error) {
    if (error.name === "AbortError") return;
    setError("chart", error);
    if (error.status >= 400 && error.status < 500) {
      dropChart();
      $("summary").textContent = "";
      showEmpty("No chart: the API refused the query (see above).");
    }
  }
  document.body.removeAttribute("aria-busy");
  window.dashboard.loads += 1;
}

function dropChart() {
  chart?.destroy();
  chart = null;
  chartSignature = "";
  drawn = null;
}

function showEmpty(text) {
  $("chart-empty-text").textContent = text;
  $("chart-empty").hidden = false;
  $("elsewhere").hidden = true;
}

/** Over an empty chart: that the range holds no events, and, when the key's last bucket
 * lies outside the range (a preset range ending now, over events sent with older times),
 * a button to the same span ending with that bucket. A last bucket inside the range holds
 * events the chosen tags leave out: no such offer then. */
function renderEmpty() {
  if (!drawn) return; // no chart: showEmpty said why
  $("chart-empty").hidden = !drawn.empty;
  $("elsewhere").hidden = true;
  if (!drawn.empty) return;
  $("chart-empty-text").textContent = "No events for this choice in this range.";
  const last = keyInfo?.key === drawn.key ? parseStart(keyInfo.last) : null;
  if (last === null || (last >= drawn.from && last < drawn.to)) return;
  $("elsewhere").hidden = false;
  const range = S.resolveRange(state, Date.now() / 1000);
  const target = S.rangeEndingAt(range, last, server?.bucket_seconds ?? 3600);
  $("elsewhere-text").textContent = `Its last events are in the bucket of ${formatTime(last)}.`;
  $("jump").textContent = `Show ${formatTime(parseStart(target.from))} → ${formatTime(parseStart(target.to))}`;
  $("jump").onclick = () => update(target);
}

function drawChart(answer, width, reached) {
  const box = $("chart");
  const size = { width: box.clientWidth || 800, height: CHART_HEIGHT };
  const config = chartConfig(answer, { stats: state.stats, groupBy: state.groupBy, fill: state.fill, width, size });
  if (chart && config.signature === chartSignature) {
    chart.setData(config.data, !zoomed);
  } else {
    dropChart();
    config.options.hooks = { setSelect: [(u) => { if (u.select.width > 0) zoomed = true; }] };
    chart = new uPlot(config.options, config.data, box);
    chart.over.addEventListener("dblclick", () => { zoomed = false; });
    chartSignature = config.signature;
    zoomed = false;
  }
  const events = answer.results.reduce((total, result) => total + result.buckets.reduce((n, b) => n + (b.count ?? 0), 0), 0);
  // a bucket holds events when it has a count, or (count not asked for) any stat not null
  const filled = (bucket) => ("count" in bucket ? bucket.count > 0 : Object.values(bucket).some((v) => typeof v === "number"));
  const empty = !answer.results.some((result) => result.buckets.some(filled));
  drawn = { key: state.key, from: parseStart(answer.from), to: parseStart(answer.to), empty };
  renderEmpty();
  const series = answer.results.length === 1 ? "1 series" : `${answer.results.length} series`;
  $("summary").textContent =
    `${answer.granularity} buckets in ${answer.tz}, ${formatTime(parseStart(answer.from))} → ${formatTime(parseStart(answer.to))} · ${series}` +
    (state.stats.includes("count") ? ` · ${formatNumber(events)} events` : "") +
    (reached.length > 1 ? ` · from the tier ${S.tierText(reached[reached.length - 1])} on` : "") +
    " · drag to zoom, double-click to reset";
}

function rememberValues(answer) {
  if (!state.groupBy) return;
  const values = seenValues.get(state.groupBy) ?? new Set();
  for (const result of answer.results) {
    if (Object.hasOwn(result.tags, state.groupBy)) values.add(result.tags[state.groupBy]);
  }
  seenValues.set(state.groupBy, values);
  renderFilterValues();
}

// ---- health and live --------------------------------------------------------------------

async function loadHealth() {
  let status;
  try {
    status = await getJSON("v1/status", []);
  } catch (error) {
    $("health-state").className = "dot failing";
    $("health-state").title = error.message;
    return;
  }
  const before = previousStatus;
  server = previousStatus = status;
  $("health-state").className = "dot ok";
  $("health-state").title = "trioagg answers";
  $("version").textContent = status.version;
  if (before && status.time > before.time) {
    const rate = (status.events_committed - before.events_committed) / (status.time - before.time);
    $("health-rate").textContent = `${formatNumber(Math.round(rate * 10) / 10)} events/s`;
  }
  const commits = before ? status.commits - before.commits : 0;
  const seconds = commits > 0 ? (status.commit_seconds_sum - before.commit_seconds_sum) / commits : status.commits ? status.commit_seconds_sum / status.commits : null;
  $("health-commit").textContent = seconds === null ? "—" : `${formatNumber(Math.round(seconds * 1e4) / 10)} ms`;
  $("health-queue").textContent = `${formatNumber(status.queue_depth)} / ${formatNumber(status.queue_capacity)}`;
  $("health-queue").classList.toggle("warn", status.queue_depth > status.queue_capacity / 2);
  $("health-total").textContent = `${formatNumber(status.events_committed)} events`;
}

function scheduleLive() {
  clearInterval(liveTimer);
  liveTimer = state.live
    ? setInterval(() => {
        if (document.hidden) return;
        // a slow answer is waited for, not cancelled by the next tick
        if (!inflight.has("chart")) loadChart();
        if (!inflight.has("top")) loadTop();
      }, state.live * 1000)
    : null;
}

// ---- wiring -----------------------------------------------------------------------------

function debounce(action, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => action(...args), ms);
  };
}

async function applyKey() {
  setApiKey($("api-key").value.trim());
  const keys = loadKeys(false);
  loadTop();
  loadHealth();
  loadKeyInfo();
  await keys; // the store's tiers, which the chart's auto granularity follows
  loadChart();
}

function wire() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", applyKey);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    applyKey();
  });
  $("search").addEventListener("input", debounce(() => update({ prefix: $("search").value }), 250));
  $("more-keys").addEventListener("click", () => loadKeys(true));
  for (const list of [$("keys"), $("top")]) {
    list.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-key]");
      if (button) selectKey(button.dataset.key);
    });
  }
  $("top-stat").addEventListener("change", () => update({ top: $("top-stat").value }));
  for (const button of document.querySelectorAll("[data-range]")) {
    button.addEventListener("click", () => {
      const range = button.dataset.range;
      if (range !== "custom") return update({ range });
      const current = S.resolveRange(state, Date.now() / 1000);
      update({ range, from: current.from, to: current.to });
      $("from").focus();
    });
  }
  const applyRange = () => update({ range: "custom", from: $("from").value.trim(), to: $("to").value.trim() });
  const applyZone = () => update({ tz: $("tz").value.trim() || S.browserZone() });
  const applyStats = (control) => update({ stats: statsFromControls(control) });
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.activeElement?.id; // Enter in a field submits the form: which field
    if (id === "filter-value") addFilter();
    else if (id === "tz") applyZone();
    else if (id === "percentiles") applyStats($("percentiles"));
    else if (state.range === "custom" || id === "apply-range") applyRange();
  });
  $("granularity").addEventListener("change", () => update({ granularity: $("granularity").value }));
  $("fill").addEventListener("change", () => update({ fill: $("fill").value }));
  $("tz").addEventListener("change", applyZone);
  for (const box of document.querySelectorAll("[data-stat]")) box.addEventListener("change", () => applyStats(box));
  $("percentiles").addEventListener("change", () => applyStats($("percentiles")));
  $("group-by").addEventListener("change", () => update({ groupBy: $("group-by").value }));
  $("filter-tag").addEventListener("change", renderFilterValues);
  $("add-filter").addEventListener("click", addFilter);
  $("live").addEventListener("change", () => update({ live: Number($("live").value) }));
  $("copy-curl").addEventListener("click", async () => {
    const text = $("curl").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      getSelection().selectAllChildren($("curl")); // no clipboard here: select it to copy by hand
    }
    $("copied").hidden = false;
    setTimeout(() => { $("copied").hidden = true; }, 1500);
  });
  new ResizeObserver(() => chart?.setSize({ width: $("chart").clientWidth, height: CHART_HEIGHT })).observe($("chart"));
  const zones = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : [];
  $("zones").replaceChildren(...["UTC", ...zones].map((value) => el("option", { value })));
}

async function start() {
  wire();
  history.replaceState(null, "", `?${S.writeState(state)}`);
  syncControls();
  const keys = loadKeys(false);
  loadTop();
  await loadHealth(); // the chart's auto granularity needs the store's bucket width
  await keys; // and its tiers
  loadKeyInfo();
  loadChart();
  setTimeout(loadHealth, 1000); // a second answer soon, for a first ingest rate
  setInterval(loadHealth, HEALTH_EVERY_MS);
  scheduleLive();
}

start();
