// What every televote web app shares: the gRPC-Web transport (same origin as the page, so the
// edge's CORS stays closed to every other origin), the caller's token, error reasons, the show
// clock and its feeds, and small DOM helpers.
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { DescService } from "@bufbuild/protobuf";
import { timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import { ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb";
import { ShowWatchService, ShowEventType, type WatchShowResponse } from "./gen/televote/sync/v1/show_watch_service_pb";
import { ShowState, type ShowSnapshot } from "./gen/televote/sync/v1/sync_types_pb";
import { ResultsService } from "./gen/televote/results/v1/results_service_pb";
import type { RoundResults } from "./gen/televote/results/v1/results_service_pb";

// ---- page parameters and the caller's token -------------------------------------------------

/** Parameters come in the URL fragment (`#episode=…&token=…`): a fragment never reaches a
 * server's logs. A token is kept for the tab's session and removed from the address bar so a
 * shared link or a screenshot does not carry it. */
export const params = new URLSearchParams(location.hash.slice(1));

const TOKEN_KEY = `televote.token${location.pathname}`;

export function takeToken(): string {
  const fromUrl = params.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    params.delete("token");
    history.replaceState(null, "", `${location.pathname}${params.size ? `#${params}` : ""}`);
  }
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

export function storeToken(token: string): void {
  sessionStorage.setItem(TOKEN_KEY, token.trim());
}

export function setParam(name: string, value: string): void {
  params.set(name, value);
  history.replaceState(null, "", `${location.pathname}#${params}`);
}

export interface Claims {
  sub: string;
  role: string;
  exp: number;
}

/** The token's claims, for display only: the edge verifies the signature. */
export function claimsOf(token: string): Claims | null {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)) as Claims;
  } catch {
    return null;
  }
}

// ---- clients ----------------------------------------------------------------------------------

export function clients(token: () => string) {
  const auth: Interceptor = (next) => async (request) => {
    const value = token();
    if (value) request.header.set("authorization", `Bearer ${value}`);
    return next(request);
  };
  const transport = createGrpcWebTransport({ baseUrl: location.origin, interceptors: [auth] });
  return <S extends DescService>(service: S): Client<S> => createClient(service, transport);
}

// ---- errors -----------------------------------------------------------------------------------

export interface Refusal {
  code: Code;
  reason: string;
  message: string;
  metadata: Record<string, string>;
  retryDelayMs: number;
}

export function refusalOf(error: unknown): Refusal {
  const connect = ConnectError.from(error);
  const info = connect.findDetails(ErrorInfoSchema)[0];
  const retry = connect.findDetails(RetryInfoSchema)[0];
  const delay = retry?.retryDelay;
  return {
    code: connect.code,
    reason: info?.reason ?? "",
    message: connect.rawMessage,
    metadata: info?.metadata ?? {},
    retryDelayMs: delay ? Number(delay.seconds) * 1000 + delay.nanos / 1e6 : 0,
  };
}

/** A call that may not have reached a service, or that the service says changed nothing:
 * safe to repeat with the same request id. */
export function isRetryable(refusal: Refusal): boolean {
  if (["UNAVAILABLE", "OVERLOADED", "DEADLINE_EXCEEDED"].includes(refusal.reason)) return true;
  return !refusal.reason && [Code.Unavailable, Code.Unknown, Code.DeadlineExceeded, Code.Canceled].includes(refusal.code);
}

/** Calls `attempt` until it answers or fails for a reason other than the network, waiting
 * longer each time (or as long as RetryInfo asks). The caller passes the same request inside
 * `attempt` every time, so a retry is the same request id and can never count twice. */
export async function withRetries<T>(attempt: () => Promise<T>, onRetry: (n: number) => void,
                                     tries = 4): Promise<T> {
  for (let n = 1; ; n++) {
    try {
      return await attempt();
    } catch (error) {
      const refusal = refusalOf(error);
      if (n >= tries || !isRetryable(refusal)) throw error;
      onRetry(n);
      await sleep(Math.max(refusal.retryDelayMs, 400 * 2 ** (n - 1)));
    }
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ---- time -------------------------------------------------------------------------------------

export const ms = (ts: Timestamp | undefined): number => (ts ? timestampMs(ts) : 0);

/** The server's clock as this browser sees it. Each message stamped by the server gives a
 * sample `server_time - now`; transit only makes a sample smaller, so the largest of the recent
 * ones is the best estimate of the offset (NTP's minimum-delay filter, one-sided). */
export class ServerClock {
  private samples: number[] = [];
  offsetMs = 0;

  sample(serverMs: number, sentAtMs = Date.now()): void {
    if (!serverMs) return;
    this.samples.push(serverMs - sentAtMs);
    if (this.samples.length > 12) this.samples.shift();
    this.offsetMs = Math.max(...this.samples);
  }

  now(): number {
    return Date.now() + this.offsetMs;
  }
}

export function formatClock(remainingMs: number): string {
  const total = Math.max(0, Math.ceil(remainingMs / 1000));
  const minutes = Math.floor(total / 60);
  return `${minutes}:${String(total % 60).padStart(2, "0")}`;
}

/** Calls `tick` each time the shown second of a countdown changes, and at least once a second.
 * A timer aimed at the next edge instead of an animation-frame loop: an idle page must not
 * wake the main thread sixty times a second. */
export function onSecondEdges(remainingMs: () => number, tick: () => void): void {
  const loop = () => {
    tick();
    const remaining = remainingMs();
    const delay = remaining > 0 ? (remaining % 1000) + 5 : 1000;
    setTimeout(loop, Math.min(1000, Math.max(20, delay)));
  };
  loop();
}

// ---- the show ---------------------------------------------------------------------------------

/** Structural events after which the page re-reads the whole snapshot (contestants of a newly
 * opened round, a performance); ticks only move the clock. */
const RELOAD_ON = new Set([
  ShowEventType.STATE_CHANGED, ShowEventType.PERFORMANCE_STARTED, ShowEventType.PERFORMANCE_ENDED,
  ShowEventType.VOTING_OPEN, ShowEventType.VOTING_EXTENDED, ShowEventType.VOTING_CLOSED,
  ShowEventType.RESULTS_READY,
]);

export interface ShowView {
  snapshot: ShowSnapshot;
  /** When the current round closes, by the server's clock (0: no deadline). */
  closesAtMs: number;
  lastEvent: ShowEventType;
}

/** WatchShow for one episode, reconnecting after a network failure, with the server's clock. */
export class ShowFeed {
  readonly clock = new ServerClock();
  view: ShowView | null = null;
  connected = false;
  private readonly watch;

  constructor(client: ReturnType<typeof clients>, readonly episodeId: string,
              private readonly onChange: (view: ShowView, event: WatchShowResponse | null) => void,
              private readonly onConnection: (connected: boolean) => void = () => {}) {
    this.watch = client(ShowWatchService);
  }

  remainingMs(): number {
    if (!this.view?.closesAtMs) return 0;
    return Math.max(0, this.view.closesAtMs - this.clock.now());
  }

  async reload(lastEvent: ShowEventType, event: WatchShowResponse | null): Promise<void> {
    const sent = Date.now();
    const { snapshot } = await this.watch.getShowState({ episodeId: this.episodeId });
    if (!snapshot) return;
    this.clock.sample(ms(snapshot.serverTime), (sent + Date.now()) / 2);
    this.view = { snapshot, closesAtMs: ms(snapshot.currentRound?.closesAt), lastEvent };
    this.onChange(this.view, event);
  }

  /** Follows the show until it ends (the server closes every watch then). */
  async run(): Promise<void> {
    for (let failures = 0; ; ) {
      try {
        for await (const event of this.watch.watchShow({ episodeId: this.episodeId })) {
          failures = 0;
          this.setConnected(true);
          this.clock.sample(ms(event.serverTime));
          await this.apply(event);
        }
        if (this.view?.snapshot.episode?.state === ShowState.ENDED) return;
      } catch (error) {
        const refusal = refusalOf(error);
        if (refusal.code === Code.NotFound || refusal.code === Code.InvalidArgument) {
          this.setConnected(false);
          throw error;
        }
      }
      this.setConnected(false);
      failures++;
      await sleep(Math.min(10_000, 500 * 2 ** Math.min(failures, 5)));
    }
  }

  private setConnected(connected: boolean): void {
    if (connected !== this.connected) {
      this.connected = connected;
      this.onConnection(connected);
    }
  }

  private async apply(event: WatchShowResponse): Promise<void> {
    const payload = event.payload;
    if (payload.case === "snapshot") {
      this.view = { snapshot: payload.value, closesAtMs: ms(payload.value.currentRound?.closesAt),
                    lastEvent: event.type };
      this.onChange(this.view, event);
    } else if (payload.case === "timing" && this.view) {
      const closes = ms(payload.value.closesAt);
      if (closes) this.view.closesAtMs = closes;
      this.view.lastEvent = event.type;
      this.onChange(this.view, event);
    } else if (RELOAD_ON.has(event.type) || !this.view) {
      await this.reload(event.type, event);
    }
  }
}

/** StreamResults for one round, reconnecting; stops when `stopped()` says so. */
export async function followResults(client: ReturnType<typeof clients>, roundId: string,
                                    onResults: (results: RoundResults) => void,
                                    stopped: () => boolean): Promise<void> {
  const results = client(ResultsService);
  for (let failures = 0; !stopped(); ) {
    try {
      for await (const update of results.streamResults({ roundId })) {
        failures = 0;
        if (stopped()) return;
        if (update.results) onResults(update.results);
        if (update.results?.isFinal) return;
      }
    } catch (error) {
      const refusal = refusalOf(error);
      if (refusal.code === Code.NotFound || refusal.code === Code.InvalidArgument) throw error;
    }
    failures++;
    await sleep(Math.min(10_000, 500 * 2 ** Math.min(failures, 5)));
  }
}

// ---- DOM --------------------------------------------------------------------------------------

/** Sets an element's text, changing its one Text node in place when it has one. Assigning
 * textContent replaces the node, and style and layout then treat it as a new node in the tree:
 * on the live displays, which rewrite a dozen figures every second, that is most of an update's
 * style and layout work. */
export function setText(element: HTMLElement, value: string): void {
  const node = element.firstChild;
  if (node instanceof Text && node === element.lastChild) {
    if (node.data !== value) node.data = value;
  } else if (element.textContent !== value) {
    element.textContent = value;
  }
}

export function $<T extends HTMLElement = HTMLElement>(selector: string, root: ParentNode = document): T {
  const element = root.querySelector<T>(selector);
  if (!element) throw new Error(`missing element ${selector}`);
  return element;
}

type Child = Node | string | null | undefined | false;

/** A small element builder: h("div.card", {title: "x"}, child, …). */
export function h<K extends keyof HTMLElementTagNameMap>(
  spec: `${K}${string}`, attributes: Record<string, string | number | boolean> = {},
  ...children: Child[]): HTMLElementTagNameMap[K] {
  const [tag, ...classes] = spec.split(".");
  const element = document.createElement(tag as K);
  if (classes.length) element.className = classes.join(" ");
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false) continue;
    element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child);
  }
  return element;
}

export const newRequestId = (): string => crypto.randomUUID();

export function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function initials(name: string): string {
  return name.split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0]?.toUpperCase()).join("");
}

/** A contestant's photo, or their initials on a colour of their own when there is none or it
 * fails to load (a broken image on air is worse than none). */
export function avatar(name: string, photoUrl: string, className = "avatar"): HTMLElement {
  const hue = [...name].reduce((sum, c) => (sum * 31 + c.charCodeAt(0)) % 360, 7);
  const box = h("span.avatar-box", { "aria-hidden": "true" }, h("span.avatar-initials", {}, initials(name)));
  box.style.setProperty("--hue", String(hue));
  box.classList.add(className);
  if (photoUrl && /^https:\/\//.test(photoUrl)) {
    const img = h("img", { src: photoUrl, alt: "", loading: "lazy", referrerpolicy: "no-referrer" });
    img.addEventListener("error", () => img.remove());
    box.append(img);
  }
  return box;
}

/** 1234567 -> 1.2M, 3456 -> 3.5K (the seed's display format). */
export function compactCount(n: number): string {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1).replace(/\.0$/, "")}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1).replace(/\.0$/, "")}K`;
  return String(n);
}
