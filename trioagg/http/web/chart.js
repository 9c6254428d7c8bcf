// An /v1/aggregates answer as a uPlot chart: one line per result (key, or group_by value)
// and stat; min and max as a band; counts on the left axis, values on the right, each
// labelled with the stats it shows.

import uPlot from "./uplot/uPlot.esm.js";

const COUNTS = new Set(["count", "distinct"]);
const STAT_COLORS = {
  count: "#2563eb",
  sum: "#0f766e",
  avg: "#d97706",
  min: "#b45309",
  max: "#b45309",
  stddev: "#7c3aed",
  distinct: "#db2777",
};
const PERCENTILE_COLORS = ["#059669", "#dc2626", "#0891b2", "#65a30d", "#9333ea"];
const GROUP_COLORS = [
  "#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
  "#92400e", "#475569",
];
const DASHES = [[], [8, 4], [2, 3], [12, 3, 2, 3], [4, 4]];
const numbers = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 6 });
const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumSignificantDigits: 3 });

export function formatNumber(value) {
  return value === null || value === undefined ? "—" : numbers.format(value);
}

function withAlpha(hex, alpha) {
  const n = Number.parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

/** A result's name in the legend: the group_by value, or the key. */
function groupName(result, groupBy) {
  if (!groupBy) return result.key;
  return Object.hasOwn(result.tags, groupBy) ? `${groupBy}=${result.tags[groupBy]}` : `no ${groupBy}`;
}

/**
 * The columns to draw: x (bucket starts, seconds) and one array per (result, stat).
 * With fill=none an empty stretch of the range has no bucket at all: a null is put one
 * bucket width after the last bucket before it, so the line breaks there instead of
 * bridging it.
 */
function plotData(answer, stats, fill, width) {
  const starts = new Set();
  const indexed = answer.results.map((result) => {
    const byStart = new Map();
    for (const bucket of result.buckets) {
      const start = Date.parse(bucket.start) / 1000;
      starts.add(start);
      byStart.set(start, bucket);
    }
    return byStart;
  });
  let xs = [...starts].sort((a, b) => a - b);
  if (fill === "none" && width) {
    const spaced = [];
    xs.forEach((x, i) => {
      if (i > 0 && x - xs[i - 1] > 1.5 * width) spaced.push(xs[i - 1] + width);
      spaced.push(x);
    });
    xs = spaced;
  }
  const columns = [];
  indexed.forEach((byStart, index) => {
    for (const stat of stats) {
      columns.push({
        result: index,
        stat,
        values: xs.map((x) => {
          const value = byStart.get(x)?.[stat];
          return typeof value === "number" ? value : null;
        }),
      });
    }
  });
  return { xs, columns };
}

function strokeOf(stat, resultIndex, statIndex, grouped, stats) {
  if (grouped) return { stroke: GROUP_COLORS[resultIndex % GROUP_COLORS.length], dash: DASHES[statIndex % DASHES.length] };
  const percentile = stats.filter((name) => !(name in STAT_COLORS)).indexOf(stat);
  const stroke = STAT_COLORS[stat] ?? PERCENTILE_COLORS[Math.max(0, percentile) % PERCENTILE_COLORS.length];
  return { stroke, dash: [] };
}

const DAY = 86400;
const formats = {
  month: uPlot.fmtDate("{YYYY}-{MM}"),
  day: uPlot.fmtDate("{MM}-{DD}"),
  year: uPlot.fmtDate("{YYYY}-{MM}-{DD}"),
  time: uPlot.fmtDate("{HH}:{mm}"),
};

/** A tick's label, ISO-like and 24-hour: months, days, or times with the date at midnight. */
function timeLabel(date, step) {
  if (step >= 28 * DAY) return formats.month(date);
  if (step >= DAY) return date.getDate() === 1 && date.getMonth() === 0 ? formats.year(date) : formats.day(date);
  const midnight = date.getHours() === 0 && date.getMinutes() === 0;
  return midnight ? `${formats.time(date)}\n${formats.day(date)}` : formats.time(date);
}

/** uPlot options and data for an answer. `tz` is the answer's (validated) zone. */
export function chartConfig(answer, { stats, groupBy, fill, width, size }) {
  const { xs, columns } = plotData(answer, stats, fill, width);
  const grouped = answer.results.length > 1;
  // each axis is labelled with the stats drawn against it
  const counts = stats.filter((stat) => COUNTS.has(stat)).join(", ");
  const values = stats.filter((stat) => !COUNTS.has(stat)).join(", ");
  const series = [{ label: "time", value: "{YYYY}-{MM}-{DD} {HH}:{mm}" }];
  const bands = [];
  const band = stats.includes("min") && stats.includes("max");
  columns.forEach((column) => {
    const result = answer.results[column.result];
    const { stroke, dash } = strokeOf(column.stat, column.result, stats.indexOf(column.stat), grouped, stats);
    const edge = band && (column.stat === "min" || column.stat === "max");
    series.push({
      label: grouped ? `${groupName(result, groupBy)} · ${column.stat}` : column.stat,
      stat: column.stat,
      group: groupName(result, groupBy),
      scale: COUNTS.has(column.stat) ? "n" : "v",
      stroke: edge ? withAlpha(stroke, 0.55) : stroke,
      dash,
      width: edge ? 1 : 2,
      spanGaps: false,
      points: { show: (u, seriesIndex, i0, i1) => i1 - i0 < 60, size: 5 },
      value: (u, value) => formatNumber(value),
    });
    if (edge && column.stat === "max") {
      const min = columns.findIndex((other) => other.result === column.result && other.stat === "min");
      bands.push({ series: [series.length - 1, min + 1], fill: withAlpha(stroke, 0.12) });
    }
  });
  const axis = (scale, side, label) => ({
    scale,
    side,
    label,
    labelSize: 20,
    size: 56,
    grid: { show: side === 3 || !counts || scale === "n", stroke: "#e5e7eb", width: 1 },
    ticks: { stroke: "#d1d5db" },
    values: (u, splits) => splits.map((v) => (v === null ? "" : compact.format(v))),
  });
  const tzDate = (seconds) => uPlot.tzDate(new Date(seconds * 1000), answer.tz);
  const time = {
    grid: { stroke: "#eef0f3", width: 1 },
    ticks: { stroke: "#d1d5db" },
    values: (u, splits, axis, space, step) => splits.map((seconds) => timeLabel(tzDate(seconds), step)),
  };
  const axes = [time];
  if (counts) axes.push(axis("n", 3, counts));
  if (values) axes.push(axis("v", counts ? 1 : 3, `value: ${values}`));
  return {
    options: {
      ...size,
      tzDate,
      scales: {
        x: { time: true },
        n: { range: (u, min, max) => uPlot.rangeNum(Math.min(0, min ?? 0), max ?? 1, 0.1, true) },
      },
      series,
      bands,
      axes,
      cursor: { focus: { prox: 24 } },
      focus: { alpha: 0.35 },
      legend: { live: true },
    },
    data: [xs, ...columns.map((column) => column.values)],
    signature: JSON.stringify([answer.tz, series.map((s) => [s.label, s.scale])]),
  };
}

export { uPlot };
