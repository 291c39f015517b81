// The live standings as the specification's display: rank badge (crown, silver, bronze, then
// #n), rank change (+n green, -n red), photo, name, formatted count, percentage bar and trend.
// Used by the results board, the broadcast overlay and the control room.
//
// An update arrives every second, so a row is built once and then only touched where it
// changed: text nodes changed in place (setText), classes, one transform for its place and one
// for its bar. Rows jump to their new place and bars step (app.css says why); a glide of the
// rows is an option (`glide`). Both badge icons are built with the row and shown by its class,
// so a rank change inserts no nodes.
import { Trend, type ContestantStanding } from "./gen/televote/results/v1/results_types_pb";
import type { RoundResults } from "./gen/televote/results/v1/results_service_pb";
import { ResultsVisibility } from "./gen/televote/sync/v1/sync_types_pb";
import { avatar, compactCount, h, setText } from "./common";

/** How long a move stays on screen: rank_change is per update (one second), too brief to read. */
const CHANGE_SHOWN_MS = 8000;

const TRENDS: Record<number, { label: string; path: string }> = {
  [Trend.RISING_FAST]: { label: "rising fast", path: "M4 14l6-6 6 6M4 9l6-6 6 6" },
  [Trend.RISING]: { label: "rising", path: "M4 12l6-6 6 6" },
  [Trend.STABLE]: { label: "stable", path: "M3 10h14M12 5l5 5-5 5" },
  [Trend.FALLING]: { label: "falling", path: "M4 8l6 6 6-6" },
  [Trend.FALLING_FAST]: { label: "falling fast", path: "M4 6l6 6 6-6M4 11l6 6 6-6" },
};

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(viewBox: string, d: string, className: string): SVGSVGElement {
  const root = document.createElementNS(SVG_NS, "svg");
  root.setAttribute("viewBox", viewBox);
  root.setAttribute("class", className);
  root.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(SVG_NS, "path");
  path.setAttribute("d", d);
  root.append(path);
  return root;
}

const CROWN = "M3 17h18l1-11-5.5 4L12 3 7.5 10 2 6z";
const MEDAL = "M12 6a7 7 0 1 0 0.01 0zM8 1h8l-2 4h-4z";

interface Row {
  element: HTMLElement;
  badge: HTMLElement;
  badgeRank: HTMLElement;
  change: HTMLElement;
  count: HTMLElement;
  percent: HTMLElement;
  bar: HTMLElement;
  trend: HTMLElement;
  rank: number;
  position: number;
  countText: string;
  percentText: string;
  barScale: string;
  trendValue: Trend;
  changeValue: number;
  changeUntil: number;
}

export interface BoardOptions {
  /** Row height in px (the overlay's rows are taller). */
  rowHeight: number;
  /** Largest number of rows shown (the overlay keeps to its frame). */
  maxRows?: number;
  /** Rows glide to a new place (a CSS transition of their transform). Without a GPU each
   * glide costs the main thread a frame to start it and one for each row that ends it, about
   * as much as the update itself, so the results board jumps unless asked (`#glide=on`). */
  glide?: boolean;
}

export class Board {
  private readonly rows = new Map<string, Row>();
  private readonly list: HTMLElement;
  private readonly empty: HTMLElement;
  total = 0;

  constructor(readonly root: HTMLElement, private readonly options: BoardOptions) {
    this.list = h(options.glide ? "ol.standings.glide" : "ol.standings", { "aria-live": "off" });
    this.empty = h("p.standings-empty", { hidden: true });
    root.replaceChildren(this.list, this.empty);
  }

  update(results: RoundResults, now = performance.now()): void {
    const standings = [...results.standings].sort(
      (a, b) => a.rank - b.rank || a.smsNumber - b.smsNumber);
    const shown = standings.slice(0, this.options.maxRows ?? standings.length);
    this.total = Number(results.totalVotes ?? 0n);
    const countsVisible = results.visibility !== ResultsVisibility.STANDINGS_ONLY &&
      results.visibility !== ResultsVisibility.HIDDEN;
    this.root.classList.toggle("counts-hidden", !countsVisible);
    const hidden = results.visibility === ResultsVisibility.HIDDEN && !results.isFinal;
    // Every second: touch the DOM only where something changed (a same-value write still
    // replaces a text node and invalidates style and layout).
    if (this.list.hidden !== hidden) this.list.hidden = hidden;
    const emptyHidden = shown.length > 0 && !hidden;
    if (this.empty.hidden !== emptyHidden) this.empty.hidden = emptyHidden;
    const emptyText = results.visibility === ResultsVisibility.HIDDEN
      ? "Results are hidden until the round is final" : "Waiting for the round";
    if (this.empty.textContent !== emptyText) this.empty.textContent = emptyText;
    const seen = new Set<string>();
    shown.forEach((standing, position) => {
      seen.add(standing.contestantId);
      let row = this.rows.get(standing.contestantId);
      if (!row) {
        row = this.createRow(standing);
        this.rows.set(standing.contestantId, row);
        this.list.append(row.element);
      }
      this.updateRow(row, standing, position, now);
    });
    for (const [id, row] of this.rows) {
      if (!seen.has(id)) {
        row.element.remove();
        this.rows.delete(id);
      }
    }
    const height = `${shown.length * this.options.rowHeight}px`;
    if (this.list.style.height !== height) this.list.style.height = height;
  }

  private createRow(standing: ContestantStanding): Row {
    const badgeRank = h("span.badge-rank");
    const badge = h("span.badge", {}, svg("0 0 24 20", CROWN, "badge-icon badge-crown"),
                    svg("0 0 24 24", MEDAL, "badge-icon badge-medal"), badgeRank);
    const change = h("span.change");
    const count = h("span.count");
    const percent = h("span.percent");
    const bar = h("span.bar-fill");
    const trend = h("span.trend");
    const element = h("li.standing", { "data-contestant": standing.contestantId },
      badge, change, avatar(standing.name, standing.photoUrl),
      h("span.who", {}, h("span.name", {}, standing.name),
        h("span.sms", {}, standing.smsNumber ? `SMS ${standing.smsNumber}` : "")),
      h("span.figures", {}, count, percent),
      h("span.bar", { "aria-hidden": "true" }, bar), trend);
    element.style.height = `${this.options.rowHeight}px`;
    return { element, badge, badgeRank, change, count, percent, bar, trend, rank: 0, position: -1,
             countText: "", percentText: "", barScale: "", trendValue: Trend.UNSPECIFIED,
             changeValue: 0, changeUntil: 0 };
  }

  private updateRow(row: Row, standing: ContestantStanding, position: number, now: number): void {
    if (row.position !== position) {
      row.position = position;
      row.element.style.transform = `translateY(${position * this.options.rowHeight}px)`;
    }
    // The move this page showed: the server's rank_change is relative to its own previous
    // tick, which a page that fell behind never saw (a slow reader gets only the latest
    // update); the server's figure serves only a row's first update.
    const moved = row.rank && standing.rank ? row.rank - standing.rank : standing.rankChange;
    if (row.rank !== standing.rank) {
      const wasLeader = row.rank === 1;
      row.rank = standing.rank;
      row.element.dataset.rank = String(standing.rank);
      if (wasLeader !== (standing.rank === 1)) row.element.classList.toggle("leader", standing.rank === 1);
      const medal = ["", "gold", "silver", "bronze"][standing.rank] ?? "";
      row.badge.className = `badge ${medal ? `badge-${medal}` : "badge-plain"}`;
      setText(row.badgeRank, medal ? String(standing.rank) : `#${standing.rank}`);
      row.badge.setAttribute("aria-label", `rank ${standing.rank}`);
    }
    if (moved !== 0) {
      row.changeUntil = now + CHANGE_SHOWN_MS;
      if (row.changeValue !== moved) {
        row.changeValue = moved;
        const up = moved > 0;
        row.change.className = `change ${up ? "change-up" : "change-down"}`;
        setText(row.change, `${up ? "+" : "−"}${Math.abs(moved)}`);
        row.change.setAttribute("aria-label", `${up ? "up" : "down"} ${Math.abs(moved)}`);
      }
    } else if (row.changeValue !== 0 && now > row.changeUntil) {
      row.changeValue = 0;
      row.change.className = "change";
      setText(row.change, "");
      row.change.removeAttribute("aria-label");
    }
    const countText = standing.formattedCount ?? (standing.count !== undefined ? compactCount(Number(standing.count)) : "");
    if (row.countText !== countText) {
      row.countText = countText;
      setText(row.count, countText);
    }
    const pct = standing.percentage ?? 0;
    const percentText = standing.percentage !== undefined ? `${pct.toFixed(1)}%` : "";
    if (row.percentText !== percentText) {
      row.percentText = percentText;
      setText(row.percent, percentText);
    }
    const barScale = `scaleX(${(Math.min(100, Math.max(0, pct)) / 100).toFixed(4)})`;
    if (row.barScale !== barScale) {
      row.barScale = barScale;
      row.bar.style.transform = barScale;
    }
    if (row.trendValue !== standing.trend) {
      row.trendValue = standing.trend;
      const trend = TRENDS[standing.trend];
      row.trend.className = `trend trend-${trend ? trend.label.replace(" ", "-") : "none"}`;
      row.trend.replaceChildren(trend ? svg("0 0 20 20", trend.path, "trend-icon") : "");
      row.trend.setAttribute("aria-label", trend?.label ?? "");
      row.trend.title = trend?.label ?? "";
    }
  }
}
