// The control room (/control) for producers: set up a show (show, episode, contestants,
// rounds), fire the cues with a confirmation for the irreversible ones, watch live counters and
// the vote rate, work the fraud review queue and the blocks. Needs an operator token
// (`televote token --role operator --sub NAME`), passed as #token=… or pasted.
//
// Every mutation carries a fresh request id and is retried with the same one after a network
// failure (the RPCs are idempotent on it).
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  $, claimsOf, clients, followResults, formatClock, h, ms, newRequestId, params, refusalOf,
  setParam, ShowFeed, storeToken, takeToken, withRetries, type ShowView,
} from "./common";
import { Board } from "./standings";
import { ShowControlService } from "./gen/televote/sync/v1/show_control_service_pb";
import { ShowEventType, type WatchShowResponse } from "./gen/televote/sync/v1/show_watch_service_pb";
import { ResultsVisibility, RoundState, ShowState, type Contestant, type Round } from "./gen/televote/sync/v1/sync_types_pb";
import { FraudReviewService } from "./gen/televote/fraud/v1/fraud_review_service_pb";
import { ReviewDecision, ReviewScope } from "./gen/televote/fraud/v1/fraud_review_service_pb";
import { BlockKind, ReviewState } from "./gen/televote/fraud/v1/fraud_types_pb";
import { ResultsService } from "./gen/televote/results/v1/results_service_pb";
import type { RoundResults } from "./gen/televote/results/v1/results_service_pb";

let token = takeToken();
const client = clients(() => token);
const control = client(ShowControlService);
const fraud = client(FraudReviewService);
const resultsClient = client(ResultsService);

/** What this control room set up, kept per browser: the API has no listing of shows. */
interface Setup {
  showId: string;
  showName: string;
  episodeId: string;
  contestants: Contestant[];
  rounds: Round[];
}

const SETUP_KEY = "televote.control.setup";
let setup: Setup = JSON.parse(localStorage.getItem(SETUP_KEY) ?? "null") as Setup | null ??
  { showId: "", showName: "", episodeId: "", contestants: [], rounds: [] };
if (params.get("episode") && params.get("episode") !== setup.episodeId) {
  setup = { showId: "", showName: "", episodeId: params.get("episode") ?? "", contestants: [], rounds: [] };
}

function save(): void {
  localStorage.setItem(SETUP_KEY, JSON.stringify(setup, (_, v: unknown) => (typeof v === "bigint" ? v.toString() : v)));
  if (setup.episodeId) setParam("episode", setup.episodeId);
}

// ---- feedback ---------------------------------------------------------------------------------

const log = $("#log");

function note(kind: "ok" | "error" | "info", text: string, reason = ""): void {
  const line = h("li", { class: `log-${kind}`, "data-reason": reason },
    h("time", {}, new Date().toLocaleTimeString("en-GB")), ` ${text}`);
  log.prepend(line);
  while (log.children.length > 60) log.lastElementChild?.remove();
  const toast = $("#toast");
  toast.textContent = text;
  toast.className = `toast toast-${kind}`;
  toast.dataset.reason = reason;
}

/** Runs one operator action: the same request id on every retry, and a line in the log. */
async function act<T>(label: string, call: (requestId: string) => Promise<T>): Promise<T | null> {
  const requestId = newRequestId();
  try {
    const answer = await withRetries(() => call(requestId), (n) => note("info", `${label}: retrying (${n})…`));
    note("ok", label);
    return answer;
  } catch (error) {
    const refusal = refusalOf(error);
    note("error", `${label} failed: ${refusal.reason || refusal.code} ${refusal.message}`, refusal.reason);
    return null;
  }
}

const dialog = $<HTMLDialogElement>("#confirm");

/** Irreversible cues ask first; the dialog names what cannot be undone. */
function confirmed(text: string): Promise<boolean> {
  $("#confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

// ---- setup ------------------------------------------------------------------------------------

function value(selector: string): string {
  return $<HTMLInputElement>(selector).value.trim();
}

function renderSetup(): void {
  $("#show-name").textContent = setup.showName || (setup.showId ? setup.showId : "—");
  $("#episode-id").textContent = setup.episodeId || "—";
  $("#episode-form").toggleAttribute("hidden", !setup.showId);
  for (const id of ["#contestant-form", "#round-form"]) $(id).toggleAttribute("hidden", !setup.episodeId);
  $("#contestant-list").replaceChildren(...setup.contestants.map((c) =>
    h("li", {}, h("span.sms-chip", {}, String(c.smsNumber)), ` ${c.name}`)));
  $("#round-contestants").replaceChildren(...setup.contestants.map((c) =>
    h("label.check", {}, h("input", { type: "checkbox", value: c.contestantId, checked: true }), ` ${c.name}`)));
  const contestantOptions = setup.contestants.map((c) => h("option", { value: c.contestantId }, `${c.smsNumber}. ${c.name}`));
  $("#performer").replaceChildren(...contestantOptions);
  $("#round-select").replaceChildren(...setup.rounds.map((r) =>
    h("option", { value: r.roundId }, `${r.name || "Round"} (${r.contestantIds.length})`)));
  // Cues need an episode; an operator with none has nothing to fire them at.
  for (const id of Object.keys(cues)) $<HTMLButtonElement>(`#${id}`).disabled = !setup.episodeId;
  const links = $("#links");
  links.replaceChildren();
  if (setup.episodeId) {
    const base = `${location.origin}`;
    for (const [label, path] of [["Voter app", "/vote"], ["Results board", "/results"],
                                 ["Overlay (key green)", "/overlay"], ["Countdown overlay", "/countdown"]]) {
      links.append(h("li", {}, h("a", { href: `${base}${path}#episode=${setup.episodeId}`, target: "_blank", rel: "noopener" }, label)));
    }
  }
}

$("#show-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = value("#new-show-name");
  const answer = await act(`Show “${name}” created`, (requestId) =>
    control.createShow({ requestId, name, broadcaster: value("#new-show-broadcaster"), timeZone: "Asia/Phnom_Penh" }));
  if (!answer?.show) return;
  setup = { showId: answer.show.showId, showName: answer.show.name, episodeId: "", contestants: [], rounds: [] };
  save();
  renderSetup();
});

$("#episode-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const title = value("#new-episode-title");
  const quota = Number(value("#new-episode-quota") || "0");
  const answer = await act(`Episode “${title}” created`, (requestId) =>
    control.createEpisode({ requestId, showId: setup.showId, title, freeVoteQuota: quota }));
  if (!answer?.episode) return;
  setup.episodeId = answer.episode.episodeId;
  setup.contestants = [];
  setup.rounds = [];
  save();
  renderSetup();
  startFeed();
});

$("#contestant-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = value("#new-contestant-name");
  const smsNumber = Number(value("#new-contestant-sms"));
  const answer = await act(`Contestant ${smsNumber} “${name}” added`, (requestId) =>
    control.addContestant({ requestId, episodeId: setup.episodeId, name, smsNumber, photoUrl: value("#new-contestant-photo") }));
  if (!answer?.contestant) return;
  setup.contestants.push(answer.contestant);
  save();
  renderSetup();
  $<HTMLFormElement>("#contestant-form").reset();
  $<HTMLInputElement>("#new-contestant-sms").value = String(smsNumber + 1);
});

$("#round-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const contestantIds = [...document.querySelectorAll<HTMLInputElement>("#round-contestants input:checked")].map((i) => i.value);
  const seconds = Number(value("#new-round-seconds") || "0");
  const name = value("#new-round-name");
  const answer = await act(`Round “${name || "Round"}” created`, (requestId) =>
    control.createRound({ requestId, episodeId: setup.episodeId, name, contestantIds,
                          visibility: Number($<HTMLSelectElement>("#new-round-visibility").value) as ResultsVisibility,
                          windowDuration: seconds ? durationFromMs(seconds * 1000) : undefined }));
  if (!answer?.round) return;
  setup.rounds.push(answer.round);
  save();
  renderSetup();
  $<HTMLSelectElement>("#round-select").value = answer.round.roundId;
});

$("#open-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const episodeId = value("#open-episode-id");
  if (!episodeId) return;
  setup = { showId: "", showName: "", episodeId, contestants: [], rounds: [] };
  save();
  renderSetup();
  startFeed();
});

// ---- cues -------------------------------------------------------------------------------------

const selectedRound = () => $<HTMLSelectElement>("#round-select").value || feed?.view?.snapshot.currentRound?.roundId || "";

const cues: Record<string, () => Promise<unknown>> = {
  "start-show": async () => (await confirmed("Start the show? Viewers' apps go live; this cannot be undone."))
    && act("Show started", (requestId) => control.startShow({ requestId, episodeId: setup.episodeId })),
  "start-performance": () => act("Performance started", (requestId) => control.startPerformance({
    requestId, episodeId: setup.episodeId, contestantId: $<HTMLSelectElement>("#performer").value,
    songTitle: value("#song-title"), songArtist: value("#song-artist") })),
  "end-performance": () => act("Performance ended", (requestId) =>
    control.endPerformance({ requestId, episodeId: setup.episodeId })),
  "open-voting": async () => {
    const seconds = Number(value("#open-seconds") || "0");
    return (await confirmed(`Open the lines for ${seconds ? `${seconds} s` : "the round's window"}? Votes start counting at once.`))
      && act("Voting opened", (requestId) => control.openVoting({
        requestId, roundId: selectedRound(), duration: seconds ? durationFromMs(seconds * 1000) : undefined }));
  },
  "extend-voting": () => {
    const seconds = Number(value("#extend-seconds") || "60");
    return act(`Voting extended by ${seconds} s`, (requestId) => control.extendVoting({
      requestId, roundId: selectedRound(), extension: durationFromMs(seconds * 1000) }));
  },
  "close-voting": async () => (await confirmed("Close the lines now? No vote after this moment counts; this cannot be undone."))
    && act("Voting closed", (requestId) => control.closeVoting({ requestId, roundId: selectedRound() })),
  "end-show": async () => (await confirmed("End the show? This cannot be undone."))
    && act("Show ended", (requestId) => control.endShow({ requestId, episodeId: setup.episodeId })),
};

for (const [id, run] of Object.entries(cues)) {
  const button = $<HTMLButtonElement>(`#${id}`);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await run();
    } finally {
      button.disabled = !setup.episodeId;
    }
  });
}

// ---- live -------------------------------------------------------------------------------------

let feed: ShowFeed | null = null;
let followedRound = "";
const board = new Board($("#board"), { rowHeight: 56 });
const rate: { at: number; total: number }[] = [];

function showStatus(view: ShowView, event: WatchShowResponse | null): void {
  const episode = view.snapshot.episode;
  const round = view.snapshot.currentRound;
  $("#show-state").textContent = episode ? ShowState[episode.state] : "—";
  $("#round-state").textContent = round ? `${round.name || "Round"}: ${RoundState[round.state]}` : "no round";
  if (event && event.type !== ShowEventType.TIME_UPDATE && event.type !== ShowEventType.COUNTDOWN) {
    $("#last-event").textContent = ShowEventType[event.type];
    document.body.dataset.lastEvent = ShowEventType[event.type];
    note("info", `event ${ShowEventType[event.type]}`);
  }
  if (view.lastEvent === ShowEventType.RESULTS_READY) document.body.dataset.resultsReady = round?.roundId ?? "true";
  const performance = view.snapshot.currentPerformance;
  const performer = view.snapshot.roundContestants.find((c) => c.contestantId === performance?.contestantId)
    ?? setup.contestants.find((c) => c.contestantId === performance?.contestantId);
  $("#on-stage").textContent = performance && !ms(performance.endTime) ? `${performer?.name ?? "?"} ${performance.songTitle ? `— “${performance.songTitle}”` : ""}` : "—";
  if (round) {
    const known = setup.rounds.findIndex((r) => r.roundId === round.roundId);
    if (known >= 0) setup.rounds[known] = round;
    if (round.roundId !== followedRound) follow(round.roundId);
  }
  if (view.lastEvent === ShowEventType.RESULTS_READY && round) void showFinal(round.roundId);
}

function follow(roundId: string): void {
  followedRound = roundId;
  rate.length = 0;
  followResults(client, roundId, onResults, () => followedRound !== roundId).catch(() => {});
}

function onResults(results: RoundResults): void {
  board.update(results);
  const total = Number(results.totalVotes ?? 0n);
  const now = Date.now();
  rate.push({ at: now, total });
  while (rate.length > 2 && now - rate[0].at > 10_000) rate.shift();
  const span = (rate[rate.length - 1].at - rate[0].at) / 1000;
  const perSecond = span > 0 ? (rate[rate.length - 1].total - rate[0].total) / span : 0;
  $("#total-votes").textContent = total.toLocaleString("en-US");
  $("#vote-rate").textContent = `${perSecond.toFixed(1)}/s`;
}

async function showFinal(roundId: string): Promise<void> {
  try {
    const final = await resultsClient.getFinalResults({ roundId });
    const names = final.winnerContestantIds.map((id) =>
      final.results?.standings.find((s) => s.contestantId === id)?.name ?? id);
    $("#final").textContent = `Final: ${Number(final.ledgerVotes).toLocaleString("en-US")} ledger votes, ` +
      `${Number(final.invalidatedVotes)} invalidated. Winner: ${names.join(", ") || "—"}. ` +
      `Root ${Array.from(final.digest?.rootHash ?? [], (b) => b.toString(16).padStart(2, "0")).join("").slice(0, 16)}…`;
    if (final.results) board.update(final.results);
  } catch (error) {
    $("#final").textContent = `Final result not available yet (${refusalOf(error).reason})`;
  }
}

function startFeed(): void {
  if (!setup.episodeId || feed?.episodeId === setup.episodeId) return;
  const current = new ShowFeed(client, setup.episodeId, showStatus,
                               (connected) => { $("#connection").textContent = connected ? "live" : "reconnecting"; });
  feed = current;
  current.run().then(() => { $("#connection").textContent = "show ended"; })
    .catch((error) => note("error", `Episode: ${refusalOf(error).message}`));
}

setInterval(() => {
  const round = feed?.view?.snapshot.currentRound;
  const open = round?.state === RoundState.OPEN;
  const remaining = open && feed ? feed.remainingMs() : 0;
  const clock = $("#clock");
  clock.textContent = open ? formatClock(remaining) : "--:--";
  clock.dataset.remainingMs = String(Math.round(remaining));
  clock.classList.toggle("clock-warning", open && remaining <= 60_000);
}, 250);

// ---- fraud review and blocks ------------------------------------------------------------------

async function loadReviews(): Promise<void> {
  if (!token) return;
  try {
    const userId = value("#review-user");
    // One user's reviews wherever they are, or the followed round's queue.
    const { reviews } = await fraud.listReviews({ state: ReviewState.PENDING, pageSize: 50,
                                                  userId, roundId: userId ? "" : followedRound });
    $("#review-count").textContent = String(reviews.length);
    $("#reviews").replaceChildren(...reviews.map((review) => {
      const scope = h("select", { "aria-label": "scope" },
        h("option", { value: String(ReviewScope.USER_ROUND) }, "all of this user's votes in the round"),
        h("option", { value: String(ReviewScope.VOTE) }, "this vote only"));
      const resolve = (decision: ReviewDecision) => async () => {
        const label = `${decision === ReviewDecision.APPROVE ? "Approved" : "Rejected"} review of ${review.userId}`;
        const answer = await act(label, (requestId) => fraud.resolveReview({
          requestId, reviewId: review.reviewId, decision, scope: Number((scope as HTMLSelectElement).value) as ReviewScope }));
        if (answer) void loadReviews();
      };
      const approve = h("button.ok", { type: "button" }, "Approve");
      approve.addEventListener("click", resolve(ReviewDecision.APPROVE));
      const reject = h("button.danger", { type: "button" }, "Reject");
      reject.addEventListener("click", resolve(ReviewDecision.REJECT));
      return h("tr", { "data-review": review.reviewId },
        h("td", {}, h("code", {}, review.userId)),
        h("td.num", {}, review.score.toFixed(2)),
        h("td", {}, review.signals.map((s) => `${s.name} +${s.contribution.toFixed(1)}`).join(", ")),
        h("td.num", {}, String(review.userRoundVotes)),
        h("td", {}, scope), h("td.actions", {}, approve, reject));
    }));
  } catch (error) {
    $("#review-count").textContent = `? (${refusalOf(error).reason || refusalOf(error).code})`;
  }
}

$("#review-filter").addEventListener("submit", (event) => {
  event.preventDefault();
  void loadReviews();
});

async function loadBlocks(): Promise<void> {
  if (!token) return;
  try {
    const { blocks } = await fraud.listBlocks({ pageSize: 100 });
    $("#blocks").replaceChildren(...blocks.map((block) => {
      const remove = h("button.secondary", { type: "button" }, "Lift");
      remove.addEventListener("click", async () => {
        if (!(await confirmed(`Lift the block on ${BlockKind[block.kind]} ${block.value}?`))) return;
        if (await act(`Block on ${block.value} lifted`, (requestId) => fraud.deleteBlock({ requestId, blockId: block.blockId }))) void loadBlocks();
      });
      return h("tr", {}, h("td", {}, BlockKind[block.kind]), h("td", {}, h("code", {}, block.value)),
        h("td", {}, block.reason), h("td", {}, block.createdBy),
        h("td", {}, ms(block.expireTime) ? new Date(ms(block.expireTime)).toLocaleString("en-GB") : "never"),
        h("td.actions", {}, remove));
    }));
  } catch (error) {
    note("error", `Blocks: ${refusalOf(error).message}`);
  }
}

$("#block-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const hours = Number(value("#block-hours") || "0");
  const answer = await act(`Blocked ${value("#block-value")}`, (requestId) => fraud.createBlock({
    requestId, kind: Number($<HTMLSelectElement>("#block-kind").value) as BlockKind, value: value("#block-value"),
    reason: value("#block-reason"), expireTime: hours ? timestampFromMs(Date.now() + hours * 3_600_000) : undefined }));
  if (answer) {
    $<HTMLFormElement>("#block-form").reset();
    void loadBlocks();
  }
});

// ---- sign-in and start ------------------------------------------------------------------------

function renderAccount(): void {
  const claims = claimsOf(token);
  $("#account").textContent = claims ? `${claims.sub} (${claims.role})` : "not signed in";
  $("#sign-in").hidden = !!token;
}

$("#sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $<HTMLTextAreaElement>("#token-input").value.trim();
  storeToken(token);
  renderAccount();
  void loadReviews();
  void loadBlocks();
});

renderAccount();
renderSetup();
startFeed();
void loadReviews();
void loadBlocks();
setInterval(() => void loadReviews(), 5000);
