// The voter app (/vote): the show's state and countdown, contestant cards, voting with free and
// paid votes, a message for every refusal, receipts checked in the browser, packages on sale.
//
// Fragment parameters: episode (required), token (a voter JWT; kept for the tab's session and
// removed from the address bar), lang (en or km), sms (the short code shown, default 1255).
import { Code } from "@connectrpc/connect";
import {
  $, avatar, claimsOf, clients, formatClock, h, hex, ms, newRequestId, onSecondEdges, params, refusalOf,
  ShowFeed, storeToken, takeToken, withRetries, type ShowView,
} from "./common";
import { I18n, initialLang, isKey, type Key } from "./i18n";
import { checkReceipt } from "./merkle";
import { VoteService } from "./gen/televote/vote/v1/vote_service_pb";
import { Channel, VoteType } from "./gen/televote/vote/v1/vote_types_pb";
import { ResultsService } from "./gen/televote/results/v1/results_service_pb";
import { RoundState, ShowState, type Contestant } from "./gen/televote/sync/v1/sync_types_pb";
import { ShowEventType } from "./gen/televote/sync/v1/show_watch_service_pb";

const i18n = new I18n(initialLang(params.get("lang")));
const episodeId = params.get("episode") ?? "";
const shortCode = params.get("sms") ?? "1255";
let token = takeToken();
const client = clients(() => token);
const votes = client(VoteService);
const results = client(ResultsService);

interface StoredReceipt {
  voteId: string;
  roundId: string;
  contestantName: string;
  count: number;
  voteType: "free" | "paid";
  receiptHash: string;
  acceptedAtMs: number;
  verified?: "ok" | "failed";
  detail?: string;
}

const deviceId = localStorage.getItem("televote.device") ?? newRequestId();
localStorage.setItem("televote.device", deviceId);

const state = {
  view: null as ShowView | null,
  freeLeft: null as number | null,
  freeQuota: null as number | null,
  paid: null as number | null,
  voteType: VoteType.FREE,
  count: 1,
  busy: false,
  taps: 0,
};

const receiptsKey = () => `televote.receipts.${claimsOf(token)?.sub ?? "anon"}.${episodeId}`;
const loadReceipts = (): StoredReceipt[] => JSON.parse(localStorage.getItem(receiptsKey()) ?? "[]") as StoredReceipt[];
const saveReceipts = (list: StoredReceipt[]) => localStorage.setItem(receiptsKey(), JSON.stringify(list.slice(0, 100)));

// ---- messages ---------------------------------------------------------------------------------

const message = $("#message");

/** The message on screen, kept as words to say again when the language changes. */
let said: (() => void) | null = null;

function sayKey(kind: "info" | "ok" | "error", key: Key, vars: Record<string, string | number> = {},
                reason = "", tap = ""): void {
  said = () => say(kind, i18n.t(key, vars), reason, tap);
  said();
}

function say(kind: "info" | "ok" | "error", text: string, reason = "", tap = ""): void {
  message.className = `message message-${kind}`;
  message.dataset.tap = tap;
  message.textContent = text;
  message.dataset.reason = reason;
  message.setAttribute("role", kind === "error" ? "alert" : "status");
  message.hidden = false;
}

function refusalKey(error: unknown): Key {
  const refusal = refusalOf(error);
  if (refusal.reason && isKey(refusal.reason)) return refusal.reason;
  if (refusal.code === Code.Unauthenticated) return "UNAUTHENTICATED";
  if (refusal.code === Code.PermissionDenied) return "PERMISSION_DENIED";
  if ([Code.Unavailable, Code.Unknown, Code.Canceled, Code.DeadlineExceeded].includes(refusal.code)) return "NETWORK";
  return "UNKNOWN";
}

// ---- the show ---------------------------------------------------------------------------------

function stateText(view: ShowView): Key {
  const episode = view.snapshot.episode;
  const round = view.snapshot.currentRound;
  if (view.lastEvent === ShowEventType.RESULTS_READY || round?.state === RoundState.FINALIZED) return "resultsFinal";
  if (round?.state === RoundState.OPEN) return "linesOpen";
  if (round?.state === RoundState.CLOSED) return "linesClosed";
  if (episode?.state === ShowState.ENDED) return "showEnded";
  if (episode?.state === ShowState.SCHEDULED) return "showScheduled";
  return "notOpenYet";
}

function renderShow(view: ShowView): void {
  state.view = view;
  const episode = view.snapshot.episode;
  $("#episode-title").textContent = episode?.title ?? "";
  const key = stateText(view);
  const pill = $("#state");
  pill.dataset.i18n = key;
  pill.textContent = i18n.t(key);
  pill.dataset.state = key;
  const performance = view.snapshot.currentPerformance;
  const performer = view.snapshot.roundContestants.find((c) => c.contestantId === performance?.contestantId);
  const now = $("#now-performing");
  now.hidden = !performance || !!ms(performance.endTime);
  if (performance) {
    $("#performer").textContent = [performer?.name, performance.songTitle && `“${performance.songTitle}”`]
      .filter(Boolean).join(" — ");
  }
  renderContestants(view.snapshot.roundContestants);
  if (view.lastEvent === ShowEventType.RESULTS_READY) verifyRound(view.snapshot.currentRound?.roundId ?? "");
}

let renderedContestants = "";

function renderContestants(contestants: Contestant[]): void {
  const key = contestants.map((c) => `${c.contestantId}:${c.name}:${c.photoUrl}`).join("|") + i18n.lang;
  if (key === renderedContestants) return;
  renderedContestants = key;
  const grid = $("#contestants");
  $("#no-round").hidden = contestants.length > 0;
  grid.replaceChildren(...[...contestants].sort((a, b) => a.smsNumber - b.smsNumber).map((c) => {
    // The visible word plus the name for screen readers (the accessible name must contain
    // the visible text, and Khmer has no spaces between words to find it by).
    const button = h("button.vote-button", { type: "button", "data-contestant": c.contestantId },
                     i18n.t("vote"), h("span.sr-only", {}, ` — ${c.name}`));
    button.addEventListener("click", () => void vote(c));
    return h("li.card", { "data-contestant": c.contestantId },
      avatar(c.name, c.photoUrl, "card-photo"),
      h("div.card-body", {},
        h("h3.card-name", {}, c.name),
        h("p.card-sms", {}, i18n.t("smsHint", { n: `V${c.smsNumber}`, code: shortCode }))),
      button);
  }));
  updateButtons();
}

function tick(feed: ShowFeed): void {
  const round = feed.view?.snapshot.currentRound;
  const open = round?.state === RoundState.OPEN;
  const remaining = open ? feed.remainingMs() : 0;
  const clock = $("#clock");
  clock.textContent = open ? formatClock(remaining) : "--:--";
  clock.dataset.remainingMs = String(Math.round(remaining));
  clock.classList.toggle("clock-warning", open && remaining <= 60_000);
  clock.classList.toggle("clock-final", open && remaining <= 10_000);
  $("#clock-box").hidden = !open;
}

// ---- wallet -----------------------------------------------------------------------------------

function renderWallet(): void {
  $("#free-left").textContent = state.freeLeft === null ? "–"
    : state.freeQuota ? `${state.freeLeft} / ${state.freeQuota}` : String(state.freeLeft);
  $("#paid-balance").textContent = state.paid === null ? "–" : state.paid.toLocaleString("en-US");
}

async function refreshBalance(): Promise<void> {
  if (!token || !episodeId) return;
  try {
    const balance = await votes.getBalance({ episodeId });
    state.freeLeft = balance.freeVotesLeft;
    state.freeQuota = balance.freeVoteQuota;
    state.paid = Number(balance.paidBalance);
    renderWallet();
  } catch (error) {
    const key = refusalKey(error);
    if (key === "UNAUTHENTICATED") showSignIn();
  }
}

function updateButtons(): void {
  const open = state.view?.snapshot.currentRound?.state === RoundState.OPEN;
  for (const button of document.querySelectorAll<HTMLButtonElement>(".vote-button")) {
    // Only a round that is not open, no token, or a vote in flight disables the buttons: the
    // server decides quotas and balances (another device may have spent them), and says why.
    button.disabled = state.busy || !token || !open;
  }
}

// ---- voting -----------------------------------------------------------------------------------

async function vote(contestant: Contestant): Promise<void> {
  const round = state.view?.snapshot.currentRound;
  if (!round || state.busy) return;
  // One request id per tap: every retry of this tap sends the same request, so the ledger
  // counts it at most once, whatever the network lost.
  const request = {
    requestId: newRequestId(), roundId: round.roundId, contestantId: contestant.contestantId,
    voteType: state.voteType, count: state.count, channel: Channel.WEB,
    client: { deviceId, appVersion: "televote-web/1" },
  };
  state.busy = true;
  updateButtons();
  // Each tap's answer carries its number, so a reader (a test, a screen reader's log) can tell
  // this answer from the last one.
  const tap = String(++state.taps);
  document.body.dataset.taps = tap;
  sayKey("info", "sending");
  try {
    const answer = await withRetries(() => votes.submitVote(request, { timeoutMs: 15_000 }),
                                     (n) => sayKey("info", "retrying", { n }));
    state.freeLeft = answer.freeVotesLeft;
    state.paid = Number(answer.paidBalance);
    renderWallet();
    const receipt: StoredReceipt = {
      voteId: answer.voteId, roundId: round.roundId, contestantName: contestant.name,
      count: request.count, voteType: request.voteType === VoteType.PAID ? "paid" : "free",
      receiptHash: hex(answer.receiptHash), acceptedAtMs: ms(answer.acceptedAt),
    };
    saveReceipts([receipt, ...loadReceipts()]);
    renderReceipts();
    sayKey("ok", "counted", { count: request.count, name: contestant.name }, "OK", tap);
  } catch (error) {
    const key = refusalKey(error);
    const refusal = refusalOf(error);
    sayKey("error", key, {}, refusal.reason || key, tap);
    if (key === "NO_FREE_VOTES") state.freeLeft = 0;
    if (key === "UNAUTHENTICATED") showSignIn();
    renderWallet();
    void refreshBalance();
  } finally {
    state.busy = false;
    updateButtons();
  }
}

// ---- receipts ---------------------------------------------------------------------------------

function renderReceipts(): void {
  const list = loadReceipts();
  $("#no-receipts").hidden = list.length > 0;
  $("#receipts").replaceChildren(...list.map((r) => {
    const status = h("p.receipt-status", { "data-verified": r.verified ?? "" },
      r.verified === "ok" ? `✓ ${r.detail ?? ""}` : r.verified === "failed" ? `✗ ${r.detail ?? ""}` : "");
    const button = h("button.secondary", { type: "button" }, i18n.t("verify"));
    button.addEventListener("click", () => void verify(r.voteId));
    return h("li.receipt", { "data-vote-id": r.voteId },
      h("div.receipt-head", {},
        h("strong", {}, `${r.count} × ${r.contestantName}`),
        h("span.tag", {}, r.voteType === "paid" ? i18n.t("paid") : i18n.t("free")), button),
      h("code.receipt-hash", { title: r.receiptHash }, `${r.receiptHash.slice(0, 16)}…`),
      h("code.receipt-id", {}, r.voteId),
      status);
  }));
}

function setReceipt(voteId: string, change: Partial<StoredReceipt>): void {
  saveReceipts(loadReceipts().map((r) => (r.voteId === voteId ? { ...r, ...change } : r)));
  renderReceipts();
}

const publicKeys = new Map<string, Uint8Array>();

async function verify(voteId: string): Promise<void> {
  const receipt = loadReceipts().find((r) => r.voteId === voteId);
  if (!receipt) return;
  const row = document.querySelector<HTMLElement>(`.receipt[data-vote-id="${voteId}"] .receipt-status`);
  if (row) row.textContent = i18n.t("verifying");
  try {
    const answer = await results.getVoteReceipt({ voteId });
    const { receipt: leaf, proof, digest } = answer;
    if (!leaf || !proof || !digest || !digest.signature.length) {
      if (row) row.textContent = i18n.t("proofPending");
      return;
    }
    let publicKey = publicKeys.get(digest.keyId);
    if (!publicKey) {
      publicKey = (await results.getLedgerPublicKey({ keyId: digest.keyId })).publicKey;
      publicKeys.set(digest.keyId, publicKey);
    }
    const check = await checkReceipt({
      roundId: receipt.roundId, voteId, leafData: leaf.leafData, leafHash: leaf.leafHash,
      receiptHash: Uint8Array.from(receipt.receiptHash.match(/../g) ?? [], (b) => parseInt(b, 16)),
      leafIndex: Number(proof.leafIndex), treeSize: Number(proof.treeSize), auditPath: proof.auditPath,
      proofRoot: proof.rootHash, signedTreeHead: digest.signedTreeHead, signature: digest.signature,
      publicKey,
    });
    const failed = check.steps.find((s) => !s.ok);
    setReceipt(voteId, check.ok
      ? { verified: "ok", detail: i18n.t("verified", { index: check.leafIndex + 1, size: check.treeSize }) }
      : { verified: "failed", detail: i18n.t("notVerified", { step: failed?.name ?? "?" }) });
  } catch (error) {
    if (row) row.textContent = i18n.t(refusalKey(error));
  }
}

const verifiedRounds = new Set<string>();

function verifyRound(roundId: string): void {
  if (!roundId || verifiedRounds.has(roundId)) return;
  verifiedRounds.add(roundId);
  for (const r of loadReceipts()) if (r.roundId === roundId && !r.verified) void verify(r.voteId);
}

// ---- packages ---------------------------------------------------------------------------------

async function loadPackages(): Promise<void> {
  if (!token) return;
  try {
    const { packages } = await votes.listVotePackages({});
    $("#packages").replaceChildren(...packages.map((p) => {
      const price = p.price ? new Intl.NumberFormat("en-US", { style: "currency", currency: p.price.currencyCode || "USD" })
        .format(Number(p.price.amountMicros) / 1e6) : "";
      return h("li.package", {},
        h("span.package-votes", {}, String(p.votes)),
        h("span.package-name", {}, p.displayName),
        p.bonusVotes ? h("span.package-bonus", {}, i18n.t("bonus", { n: p.bonusVotes })) : null,
        h("span.package-price", {}, price));
    }));
  } catch {
    // Packages are an offer, not the vote: the page works without them.
  }
}

// ---- sign-in, language, controls ----------------------------------------------------------------

function showSignIn(): void {
  $("#sign-in").hidden = false;
}

function renderAccount(): void {
  const claims = claimsOf(token);
  $("#account").textContent = claims ? i18n.t("signedInAs", { sub: claims.sub }) : "";
  $("#sign-in").hidden = !!token;
}

function applyLanguage(): void {
  i18n.apply();
  $("#lang").textContent = i18n.t("language");
  renderedContestants = "";
  if (state.view) renderShow(state.view);
  renderAccount();
  renderReceipts();
  void loadPackages();
  said?.();
}

$("#lang").addEventListener("click", () => {
  i18n.lang = i18n.lang === "en" ? "km" : "en";
  localStorage.setItem("televote.lang", i18n.lang);
  applyLanguage();
});

$("#sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $<HTMLTextAreaElement>("#token-input").value.trim();
  if (!value) return;
  storeToken(value);
  token = value;
  renderAccount();
  updateButtons();
  void refreshBalance();
  void loadPackages();
});

for (const input of document.querySelectorAll<HTMLInputElement>("input[name=vote-type]")) {
  input.addEventListener("change", () => {
    state.voteType = input.value === "paid" ? VoteType.PAID : VoteType.FREE;
  });
}
$<HTMLSelectElement>("#count").addEventListener("change", (event) => {
  state.count = Number((event.target as HTMLSelectElement).value);
});

// ---- start ------------------------------------------------------------------------------------

applyLanguage();
renderWallet();
if (!episodeId) {
  say("error", "Add #episode=<episode id> to the address.", "NO_EPISODE");
} else {
  const feed = new ShowFeed(client, episodeId, (view) => {
    renderShow(view);
    updateButtons();
  }, (connected) => {
    $("#offline").hidden = connected;
    if (connected) void refreshBalance();
  });
  feed.run().catch((error) => say("error", String(refusalOf(error).message), "EPISODE"));
  onSecondEdges(() => feed.remainingMs(), () => tick(feed));
  void refreshBalance();
}
