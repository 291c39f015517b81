// A voter's own check of their receipt, in the browser with WebCrypto: the same RFC 9162 leaf
// and node hashing as results_svc/merkle.py, the signed tree head of results_svc/signing.py
// (televote-tree-head/v1), and its Ed25519 signature under the ledger's published key.


async function sha256(...parts: Uint8Array[]): Promise<Uint8Array> {
  const joined = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    joined.set(part, at);
    at += part.length;
  }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", joined));
}

export const leafHash = (leafData: Uint8Array) => sha256(Uint8Array.of(0), leafData);
const nodeHash = (left: Uint8Array, right: Uint8Array) => sha256(Uint8Array.of(1), left, right);

export function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((value, i) => value === b[i]);
}

/** RFC 9162 section 2.1.3.2, as results_svc.merkle.verify_inclusion. */
export async function verifyInclusion(leaf: Uint8Array, index: number, treeSize: number,
                                      path: Uint8Array[], root: Uint8Array): Promise<boolean> {
  if (index >= treeSize || treeSize <= 0) return false;
  let fn = index;
  let sn = treeSize - 1;
  let r = leaf;
  for (const p of path) {
    if (p.length !== 32 || sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      if (fn % 2 === 0) {
        while (fn !== 0 && fn % 2 === 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  return sn === 0 && equalBytes(r, root);
}

export interface TreeHead {
  roundId: string;
  treeSize: number;
  rootHex: string;
  signedAt: string;
}

export function parseTreeHead(head: Uint8Array): TreeHead | null {
  const lines = new TextDecoder().decode(head).split("\n");
  if (lines.length !== 6 || lines[0] !== "televote-tree-head/v1" || lines[5] !== "") return null;
  return { roundId: lines[1], treeSize: Number(lines[2]), rootHex: lines[3], signedAt: lines[4] };
}

export async function verifyEd25519(publicKey: Uint8Array, message: Uint8Array,
                                    signature: Uint8Array): Promise<boolean> {
  const key = await crypto.subtle.importKey("raw", new Uint8Array(publicKey), { name: "Ed25519" }, false, ["verify"]);
  return crypto.subtle.verify({ name: "Ed25519" }, key, new Uint8Array(signature), new Uint8Array(message));
}

export interface ReceiptCheck {
  ok: boolean;
  /** One line per check, in order, for the voter to read. */
  steps: { name: string; ok: boolean }[];
  leafIndex: number;
  treeSize: number;
}

export interface ReceiptInput {
  roundId: string;
  voteId: string;
  leafData: Uint8Array;
  leafHash: Uint8Array;
  receiptHash: Uint8Array;
  leafIndex: number;
  treeSize: number;
  auditPath: Uint8Array[];
  proofRoot: Uint8Array;
  signedTreeHead: Uint8Array;
  signature: Uint8Array;
  publicKey: Uint8Array;
}

/** Every link from the hash the voter was given when they voted to the key that signed the
 * round's result. */
export async function checkReceipt(r: ReceiptInput): Promise<ReceiptCheck> {
  const steps: { name: string; ok: boolean }[] = [];
  const computed = await leafHash(r.leafData);
  let leafJson: Record<string, unknown> = {};
  try {
    leafJson = JSON.parse(new TextDecoder().decode(r.leafData)) as Record<string, unknown>;
  } catch {
    // reported by the step below
  }
  steps.push({ name: "leaf", ok: leafJson.vote_id === r.voteId && leafJson.round_id === r.roundId });
  steps.push({ name: "hash", ok: equalBytes(computed, r.leafHash) && equalBytes(computed, r.receiptHash) });
  steps.push({ name: "proof", ok: await verifyInclusion(computed, r.leafIndex, r.treeSize, r.auditPath, r.proofRoot) });
  const head = parseTreeHead(r.signedTreeHead);
  const hexRoot = Array.from(r.proofRoot, (b) => b.toString(16).padStart(2, "0")).join("");
  steps.push({ name: "head", ok: head !== null && head.roundId === r.roundId &&
               head.treeSize === r.treeSize && head.rootHex === hexRoot });
  let signed = false;
  try {
    signed = await verifyEd25519(r.publicKey, r.signedTreeHead, r.signature);
  } catch {
    signed = false;
  }
  steps.push({ name: "signature", ok: signed });
  return { ok: steps.every((s) => s.ok), steps, leafIndex: r.leafIndex, treeSize: r.treeSize };
}

