// The page's state and its address: every choice is a parameter of the page's URL,
// named as the API names it where there is one, so a view can be bookmarked and shared.
// No DOM here.

const PRESETS = { "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 };
const GRANULARITIES = ["auto", "bucket", "hour", "day", "week", "month"];
const FILLS = ["null", "zero", "none"];
const TOP_STATS = ["count", "sum"];
const DEFAULT_STATS = ["count", "avg", "min", "max"];
/** Stats the page offers as check boxes, in the order it asks for them; min and max go
 * together, drawn as a band. Anything else (percentiles) is typed. */
export const CHECKED_STATS = ["count", "sum", "avg", "min", "max", "stddev", "distinct"];
const BAND = ["min", "max"];
/** Auto granularity: the finest that draws at most this many buckets. */
const MOST_POINTS = 1000;
const WIDTHS = { hour: 3600, day: 86400, week: 7 * 86400, month: 31 * 86400 };
const MAX_LIVE = 3600;
/** trioagg.core.tiers.QUERY_MARGIN: a coarse tier may hold data from this much later than its
 * horizon says. */
const QUERY_MARGIN = 300;

export function browserZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

function oneOf(value, choices, fallback) {
  return choices.includes(value) ? value : fallback;
}

/** The state a page address describes; anything missing or unknown gets its default. */
export function readState(search) {
  const params = new URLSearchParams(search);
  // [name, value] pairs, not an object: a tag may be called __proto__
  const tags = [];
  for (const [name, value] of params) {
    if (name.startsWith("tag.") && name.length > 4) tags.push([name.slice(4), value]);
  }
  const custom = params.has("from") || params.has("to");
  const range = params.get("range") ?? (custom ? "custom" : "24h");
  const stats = (params.get("stats") ?? "").split(",").filter(Boolean);
  const groupBy = params.get("group_by") ?? "";
  const chosen = stats.length ? [...new Set(stats)] : DEFAULT_STATS;
  const live = Number.parseInt(params.get("live") ?? "0", 10);
  return {
    key: params.get("key") ?? "",
    prefix: params.get("prefix") ?? "",
    range: range in PRESETS || range === "custom" ? range : "24h",
    from: params.get("from") ?? "",
    to: params.get("to") ?? "",
    granularity: oneOf(params.get("granularity"), GRANULARITIES, "auto"),
    tz: params.get("tz") || browserZone(),
    fill: oneOf(params.get("fill"), FILLS, "null"),
    stats: groupBy ? oneStat(chosen) : chosen,
    groupBy,
    tags,
    top: oneOf(params.get("top"), TOP_STATS, "count"),
    live: live >= 1 && live <= MAX_LIVE ? live : 0,
  };
}

/** The stats a chart grouped by a tag draws: the first of them only (or the min/max band
 * when it comes first), one line per group, as 4 stats of 3 groups in 12 lines of one
 * chart could not be read. */
export function oneStat(stats) {
  if (BAND.includes(stats[0]) && BAND.every((name) => stats.includes(name))) return BAND;
  return stats.slice(0, 1);
}

/** The page address's query for a state (the inverse of readState). */
export function writeState(state) {
  const params = new URLSearchParams();
  if (state.key) params.set("key", state.key);
  params.set("range", state.range);
  if (state.range === "custom") {
    params.set("from", state.from);
    params.set("to", state.to);
  }
  params.set("granularity", state.granularity);
  params.set("tz", state.tz);
  params.set("fill", state.fill);
  params.set("stats", state.stats.join(","));
  if (state.groupBy) params.set("group_by", state.groupBy);
  for (const [name, value] of state.tags) params.append(`tag.${name}`, value);
  params.set("top", state.top);
  if (state.prefix) params.set("prefix", state.prefix);
  if (state.live) params.set("live", String(state.live));
  return params.toString();
}

/** RFC 3339 in UTC, whole seconds. */
function iso(seconds) {
  return new Date(seconds * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
}

/** Seconds of a time as the API reads it (RFC 3339 or Unix seconds), or null. */
function parseTime(text) {
  if (/^\s*-?\d+(\.\d+)?\s*$/.test(text)) return Number(text);
  const ms = Date.parse(text);
  return Number.isNaN(ms) ? null : ms / 1000;
}

/** The range to ask for: a preset ends now; a custom range is sent as typed, for the API
 * to judge (and refuse with its own words). */
export function resolveRange(state, now) {
  if (state.range === "custom") {
    const start = parseTime(state.from);
    const end = parseTime(state.to);
    const span = start !== null && end !== null && end > start ? end - start : null;
    return { from: state.from, to: state.to, span };
  }
  const end = Math.floor(now);
  return { from: iso(end - PRESETS[state.range]), to: iso(end), span: PRESETS[state.range] };
}

/** How many seconds before `now` a range resolveRange gave starts; null when the page
 * cannot read its start. */
export function rangeAge(range, now) {
  const start = parseTime(range.from);
  return start === null ? null : Math.max(0, now - start);
}

/** A range of the same span as `range` that ends with the bucket starting at `last`
 * (seconds): where a key's latest events are when the range chosen holds none. */
export function rangeEndingAt(range, last, bucketSeconds) {
  const end = last + bucketSeconds;
  const span = range.span ?? PRESETS["24h"];
  return { range: "custom", from: iso(end - span), to: iso(end) };
}

/** The nominal width of a granularity's buckets, in seconds. */
export function bucketWidth(granularity, bucketSeconds) {
  return granularity === "bucket" ? bucketSeconds : WIDTHS[granularity];
}

/** The granularity to ask for: the one chosen, or for auto the finest that keeps the
 * chart under MOST_POINTS buckets (so the page never asks for more than it can show)
 * and that every tier the range reaches can answer (`reached`: see tiersReached). When
 * no granularity suits them all, the API's refusal says why. */
export function chooseGranularity(state, span, bucketSeconds, reached = []) {
  if (state.granularity !== "auto") return state.granularity;
  const candidates = bucketSeconds < 3600 ? ["bucket", "hour", "day", "week", "month"] : ["hour", "day", "week", "month"];
  const served = candidates.filter((name) => reached.every((tier) => tierServes(tier, name, state.tz, bucketSeconds)));
  if (span === null) return served[0] === "bucket" ? "hour" : (served[0] ?? "hour");
  const fits = (name) => name === "month" || span / bucketWidth(name, bucketSeconds) <= MOST_POINTS;
  // none: only another zone's days can refuse a calendar granularity, and the API's
  // refusal of one names the zone the tier keeps
  return served.find(fits) ?? ["day", "week", "month"].find(fits);
}

/** Seconds of a tier's width or horizon as /v1/keys writes them (1m, 36h, 7d); null for
 * forever. */
export function spanSeconds(text) {
  const match = /^(\d+)([mhd])$/.exec(text);
  return match ? Number(match[1]) * { m: 60, h: 3600, d: 86400 }[match[2]] : null;
}

/** The tiers (/v1/keys' `tiers`, finest first) a range starting `age` seconds ago may
 * read: the finest, and each one whose finer neighbour's horizon the range reaches past.
 * The server takes a tier to hold data a little (QUERY_MARGIN) earlier than its horizon
 * says, and so does this. */
export function tiersReached(tiers, age) {
  if (!tiers || !tiers.length) return [];
  if (age === null) return tiers; // a range the page cannot read: assume every tier
  return tiers.filter((tier, index) => index === 0 || age + QUERY_MARGIN > spanSeconds(tiers[index - 1].horizon));
}

/** Whether a tier's buckets are whole within every answer bucket of `granularity` in
 * zone `tz`: a fixed step its width divides, or days of its own zone for a day tier. */
export function tierServes(tier, granularity, tz, bucketSeconds) {
  const width = spanSeconds(tier.width);
  if (granularity === "bucket") return width === bucketSeconds;
  if (granularity === "hour") return 3600 % width === 0;
  return width < 86400 || (tier.zone ?? "UTC") === tz;
}

/** A tier as the page shows it: "1h for 400d", "1d in Europe/Paris forever". */
export function tierText(tier) {
  const zone = tier.zone && tier.zone !== "UTC" ? ` in ${tier.zone}` : "";
  return `${tier.width}${zone} ${tier.horizon === "forever" ? "forever" : `for ${tier.horizon}`}`;
}

/** The /v1/aggregates parameters of a state, in a fixed order. */
export function aggregateParams(state, range, granularity) {
  const params = [
    ["key", state.key],
    ["from", range.from],
    ["to", range.to],
    ["granularity", granularity],
    ["tz", state.tz],
    ["fill", state.fill],
    ["stats", state.stats.join(",")],
  ];
  if (state.groupBy) params.push(["group_by", state.groupBy]);
  for (const [name, value] of state.tags) params.push([`tag.${name}`, value]);
  return params;
}

/** fnmatch's case-sensitive glob (what --quantiles patterns are) as a RegExp. */
function globToRegExp(pattern) {
  let source = "";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "*") source += ".*";
    else if (c === "?") source += ".";
    else if (c === "[") {
      const end = pattern.indexOf("]", i + 2);
      if (end < 0) {
        source += "\\[";
      } else {
        let set = pattern.slice(i + 1, end).replace(/\\/g, "\\\\");
        if (set.startsWith("!")) set = "^" + set.slice(1);
        else if (set.startsWith("^")) set = "\\" + set;
        source += `[${set}]`;
        i = end;
      }
    } else source += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  }
  return new RegExp(`^${source}$`, "s");
}

export function keepsQuantiles(key, patterns) {
  return patterns.some((pattern) => globToRegExp(pattern).test(key));
}
