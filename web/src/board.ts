// The public displays: the results board (/results), the 1920x1080 broadcast overlay
// (/overlay) and the countdown overlay (/countdown). All follow the episode's current round
// through WatchShow, the board and overlay its live results through StreamResults too; none
// needs a token.
//
// Fragment parameters: episode (required), round (pin one round instead of following the
// show), bg (overlays: green, blue, magenta, black or transparent — the key colour of the
// graphics machine), rows (overlay: most rows shown), glide (on/off: rows glide to a new
// place; on by default on the overlay only), lang.
import { $, clients, followResults, formatClock, onSecondEdges, params, setText, ShowFeed, type ShowView } from "./common";
import { Board } from "./standings";
import { RoundState } from "./gen/televote/sync/v1/sync_types_pb";
import { ShowEventType } from "./gen/televote/sync/v1/show_watch_service_pb";
import type { RoundResults } from "./gen/televote/results/v1/results_service_pb";

const app = document.body.dataset.app ?? "results";
const client = clients(() => "");
const episodeId = params.get("episode") ?? "";
const pinnedRound = params.get("round") ?? "";

const KEYS: Record<string, string> = {
  green: "#00b140", blue: "#0047bb", magenta: "#ff00ff", black: "#000000", transparent: "transparent",
};
if (app !== "results") {
  document.documentElement.style.setProperty("--key", KEYS[params.get("bg") ?? "green"] ?? KEYS.green);
}

const status = $("#status");
const clock = $("#clock");
const title = document.querySelector<HTMLElement>("#title");
const roundName = document.querySelector<HTMLElement>("#round-name");
const total = document.querySelector<HTMLElement>("#total");
const boardRoot = document.querySelector<HTMLElement>("#board");
const board = boardRoot ? new Board(boardRoot, {
  rowHeight: app === "overlay" ? 72 : 64,
  maxRows: app === "overlay" ? Number(params.get("rows") ?? 12) : undefined,
  // The broadcast overlay glides (its graphics machine renders for air); the board jumps.
  glide: (params.get("glide") ?? (app === "overlay" ? "on" : "off")) === "on",
}) : null;
const votes = new Intl.NumberFormat("en-US");

let followed = "";
let updates = 0;

function roundLabel(view: ShowView): string {
  const round = view.snapshot.currentRound;
  if (!round) return "Waiting for voting to open";
  if (view.lastEvent === ShowEventType.RESULTS_READY || round.state === RoundState.FINALIZED) return "Final result";
  if (round.state === RoundState.OPEN) return "Lines are open";
  if (round.state === RoundState.CLOSED) return "Lines closed — counting";
  return "Voting opens soon";
}

function render(view: ShowView): void {
  const episode = view.snapshot.episode;
  if (title && episode) setText(title, episode.title);
  const round = view.snapshot.currentRound;
  if (roundName) setText(roundName, round?.name || "");
  setText(status, roundLabel(view));
  document.body.dataset.roundState = round ? RoundState[round.state] : "NONE";
  const roundId = pinnedRound || round?.roundId || "";
  // The countdown overlay shows no standings: it follows the show alone, not the results.
  const showsResults = board !== null || total !== null;
  if (showsResults && roundId && roundId !== followed) follow(roundId);
}

function follow(roundId: string): void {
  followed = roundId;
  followResults(client, roundId, onResults, () => followed !== roundId).catch((error) => {
    status.textContent = `Round unavailable: ${String(error)}`;
  });
}

/** Standings received and not yet shown, oldest first. */
const pending: RoundResults[] = [];

/** While the countdown runs, each update is shown on one of its second edges, so the page
 * renders one frame a second rather than two (each frame costs the main thread about a
 * millisecond of fixed work without a GPU). One update per edge, queued rather than replaced:
 * the stream's ticks and the clock's edges are both a second apart but jitter, and a second
 * whose update was replaced by the next would show no change. At most two wait (a late tick
 * is shown a second later); without a running countdown, and for the final result, at once. */
function onResults(results: RoundResults): void {
  if (!countdownRunning() || results.isFinal) {
    pending.length = 0;
    show(results);
    return;
  }
  pending.push(results);
  if (pending.length > 2) pending.shift();
}

function countdownRunning(): boolean {
  return feed?.view?.snapshot.currentRound?.state === RoundState.OPEN && feed.remainingMs() > 0;
}

function show(results: RoundResults): void {
  board?.update(results);
  updates++;
  document.body.dataset.updates = String(updates);
  const totalText = results.totalVotes !== undefined
    ? `${votes.format(results.totalVotes)} votes` : "";
  if (total) setText(total, totalText);
  if (results.isFinal) {
    setText(status, "Final result");
    document.body.dataset.final = "true";
  }
}

function tick(feed: ShowFeed): void {
  const next = pending.shift();
  if (next) show(next);
  const round = feed.view?.snapshot.currentRound;
  const open = round?.state === RoundState.OPEN;
  const remaining = open ? feed.remainingMs() : 0;
  setText(clock, open ? formatClock(remaining) : round ? "0:00" : "--:--");
  clock.dataset.remainingMs = String(Math.round(remaining));
  clock.classList.toggle("clock-warning", open && remaining <= 60_000);
  clock.classList.toggle("clock-final", open && remaining <= 10_000);
}

const feed = episodeId ? new ShowFeed(client, episodeId, render,
                                     (connected) => document.body.classList.toggle("offline", !connected))
  : null;
if (!feed) {
  status.textContent = "Add #episode=<episode id> to the address";
} else {
  feed.run().catch((error) => { status.textContent = `Episode unavailable: ${String(error)}`; });
  onSecondEdges(() => feed.remainingMs(), () => tick(feed));
}

