// The voter app's words in English and Khmer. Every refusal reason of VoteService.SubmitVote
// (vote_service.proto) has its own message; tests look them up by reason via data-reason.

export type Lang = "en" | "km";

const en = {
  appName: "Vote",
  signIn: "Sign in",
  signInHelp: "Paste the voting token from your account to vote.",
  signedInAs: "Signed in as {sub}",
  language: "ភាសាខ្មែរ",
  linesOpen: "Lines are open",
  linesCloseIn: "Lines close in",
  notOpenYet: "Voting has not opened yet",
  linesClosed: "Lines are closed",
  resultsFinal: "The result is final",
  showScheduled: "The show starts soon",
  showEnded: "The show has ended",
  offline: "Reconnecting…",
  nowPerforming: "Now performing",
  freeLeft: "Free votes left",
  paidBalance: "Paid votes",
  voteWith: "Vote with",
  free: "Free",
  paid: "Paid",
  votesPerTap: "Votes per tap",
  vote: "Vote",
  smsHint: "SMS {n} to {code}",
  sending: "Sending your vote…",
  retrying: "Connection lost — retrying your vote ({n})…",
  counted: "Counted: {count} for {name}. Thank you!",
  receipts: "Your receipts",
  noReceipts: "Votes you cast appear here with a receipt you can check once the result is final.",
  verify: "Verify",
  verifying: "Checking…",
  proofPending: "Recorded. The proof is available when the round's result is final.",
  verified: "Verified: leaf {index} of {size} in the signed result",
  notVerified: "This receipt did NOT verify ({step})",
  packages: "Vote packages",
  packagesHelp: "Buy packages in the X Factor app; paid votes are shared with this page.",
  bonus: "+{n} bonus",
  contestants: "Contestants",
  noRound: "Contestants appear when voting opens.",
  // Refusals, by ErrorInfo reason.
  VOTING_NOT_OPEN: "Voting has not opened yet. Stay tuned!",
  VOTING_CLOSED: "Sorry, lines are closed. Your vote was not counted.",
  INVALID_CONTESTANT: "That contestant is not in this round.",
  NO_FREE_VOTES: "You have used all your free votes for this episode. Use paid votes to keep voting.",
  INSUFFICIENT_BALANCE: "Not enough paid votes for that. Lower the count or buy a package.",
  IDEMPOTENCY_MISMATCH: "That vote was already sent differently. Please tap Vote again.",
  RATE_LIMITED: "You are voting too fast. Please wait a moment and try again.",
  FRAUD_BLOCKED: "Your account cannot vote right now. Contact the broadcaster if you think this is wrong.",
  GEO_RESTRICTED: "Voting is open to viewers in Cambodia only. Your vote was not counted.",
  LOCATION_MISMATCH: "Your phone's location does not match your network's. Turn off any VPN and try again.",
  UNAVAILABLE: "Your vote was not recorded: the service is unavailable. Please try again.",
  OVERLOADED: "Your vote was not recorded: lines are very busy. Please try again in a few seconds.",
  DEADLINE_EXCEEDED: "Your vote was not recorded in time. Please try again.",
  ROUND_NOT_FOUND: "This round no longer exists. Reload the page.",
  INVALID_REQUEST: "That vote could not be sent. Reload the page and try again.",
  UNAUTHENTICATED: "Please sign in again: your voting token is missing or expired.",
  PERMISSION_DENIED: "This account is not allowed to vote.",
  NETWORK: "No connection: your vote was not recorded. Check your network and try again.",
  UNKNOWN: "Something went wrong; your vote may not have been recorded. Please try again.",
};

export type Key = keyof typeof en;

const km: Record<Key, string> = {
  appName: "បោះឆ្នោត",
  signIn: "ចូលគណនី",
  signInHelp: "បិទភ្ជាប់សញ្ញាសម្ងាត់បោះឆ្នោតពីគណនីរបស់អ្នក ដើម្បីបោះឆ្នោត។",
  signedInAs: "បានចូលជា {sub}",
  language: "English",
  linesOpen: "ការបោះឆ្នោតកំពុងបើក",
  linesCloseIn: "ការបោះឆ្នោតបិទក្នុងរយៈពេល",
  notOpenYet: "ការបោះឆ្នោតមិនទាន់បើកនៅឡើយទេ",
  linesClosed: "ការបោះឆ្នោតបានបិទហើយ",
  resultsFinal: "លទ្ធផលចុងក្រោយ",
  showScheduled: "កម្មវិធីនឹងចាប់ផ្តើមឆាប់ៗនេះ",
  showEnded: "កម្មវិធីបានបញ្ចប់ហើយ",
  offline: "កំពុងភ្ជាប់ឡើងវិញ…",
  nowPerforming: "កំពុងសម្តែង",
  freeLeft: "សន្លឹកឆ្នោតឥតគិតថ្លៃនៅសល់",
  paidBalance: "សន្លឹកឆ្នោតបង់ប្រាក់",
  voteWith: "បោះឆ្នោតដោយ",
  free: "ឥតគិតថ្លៃ",
  paid: "បង់ប្រាក់",
  votesPerTap: "ចំនួនសន្លឹកក្នុងមួយដង",
  vote: "បោះឆ្នោត",
  smsHint: "ផ្ញើសារ {n} ទៅ {code}",
  sending: "កំពុងផ្ញើសន្លឹកឆ្នោតរបស់អ្នក…",
  retrying: "ការតភ្ជាប់បានដាច់ — កំពុងផ្ញើម្តងទៀត ({n})…",
  counted: "បានរាប់៖ {count} សម្រាប់ {name}។ សូមអរគុណ!",
  receipts: "បង្កាន់ដៃរបស់អ្នក",
  noReceipts: "សន្លឹកឆ្នោតដែលអ្នកបានបោះនឹងបង្ហាញនៅទីនេះ ជាមួយបង្កាន់ដៃដែលអាចផ្ទៀងផ្ទាត់បាន នៅពេលលទ្ធផលចុងក្រោយ។",
  verify: "ផ្ទៀងផ្ទាត់",
  verifying: "កំពុងពិនិត្យ…",
  proofPending: "បានកត់ត្រា។ ភស្តុតាងនឹងមាននៅពេលលទ្ធផលនៃជុំនេះចុងក្រោយ។",
  verified: "បានផ្ទៀងផ្ទាត់៖ ស្លឹកទី {index} ក្នុងចំណោម {size} នៃលទ្ធផលដែលបានចុះហត្ថលេខា",
  notVerified: "បង្កាន់ដៃនេះមិនត្រឹមត្រូវទេ ({step})",
  packages: "កញ្ចប់សន្លឹកឆ្នោត",
  packagesHelp: "ទិញកញ្ចប់នៅក្នុងកម្មវិធី X Factor។ សន្លឹកឆ្នោតបង់ប្រាក់ប្រើបាននៅទីនេះផងដែរ។",
  bonus: "+{n} បន្ថែម",
  contestants: "បេក្ខជន",
  noRound: "បេក្ខជននឹងបង្ហាញនៅពេលការបោះឆ្នោតបើក។",
  VOTING_NOT_OPEN: "ការបោះឆ្នោតមិនទាន់បើកនៅឡើយទេ។ សូមរង់ចាំ!",
  VOTING_CLOSED: "សូមអភ័យទោស ការបោះឆ្នោតបានបិទហើយ។ សន្លឹកឆ្នោតរបស់អ្នកមិនត្រូវបានរាប់ទេ។",
  INVALID_CONTESTANT: "បេក្ខជននេះមិនស្ថិតក្នុងជុំនេះទេ។",
  NO_FREE_VOTES: "អ្នកបានប្រើសន្លឹកឆ្នោតឥតគិតថ្លៃទាំងអស់សម្រាប់វគ្គនេះហើយ។ សូមប្រើសន្លឹកឆ្នោតបង់ប្រាក់ ដើម្បីបន្តបោះឆ្នោត។",
  INSUFFICIENT_BALANCE: "សន្លឹកឆ្នោតបង់ប្រាក់មិនគ្រប់គ្រាន់។ សូមបន្ថយចំនួន ឬទិញកញ្ចប់។",
  IDEMPOTENCY_MISMATCH: "សន្លឹកឆ្នោតនេះត្រូវបានផ្ញើរួចហើយខុសពីនេះ។ សូមចុចបោះឆ្នោតម្តងទៀត។",
  RATE_LIMITED: "អ្នកបោះឆ្នោតលឿនពេក។ សូមរង់ចាំបន្តិច ហើយព្យាយាមម្តងទៀត។",
  FRAUD_BLOCKED: "គណនីរបស់អ្នកមិនអាចបោះឆ្នោតបានទេនៅពេលនេះ។ សូមទាក់ទងអ្នកផ្សាយ ប្រសិនបើអ្នកគិតថានេះខុស។",
  GEO_RESTRICTED: "ការបោះឆ្នោតបើកសម្រាប់តែអ្នកទស្សនានៅកម្ពុជាប៉ុណ្ណោះ។ សន្លឹកឆ្នោតរបស់អ្នកមិនត្រូវបានរាប់ទេ។",
  LOCATION_MISMATCH: "ទីតាំងទូរសព្ទរបស់អ្នកមិនត្រូវនឹងបណ្តាញរបស់អ្នកទេ។ សូមបិទ VPN ហើយព្យាយាមម្តងទៀត។",
  UNAVAILABLE: "សន្លឹកឆ្នោតរបស់អ្នកមិនត្រូវបានកត់ត្រាទេ៖ សេវាកម្មមិនដំណើរការ។ សូមព្យាយាមម្តងទៀត។",
  OVERLOADED: "សន្លឹកឆ្នោតរបស់អ្នកមិនត្រូវបានកត់ត្រាទេ៖ ខ្សែរវល់ខ្លាំង។ សូមព្យាយាមម្តងទៀតក្នុងពេលបន្តិចទៀត។",
  DEADLINE_EXCEEDED: "សន្លឹកឆ្នោតរបស់អ្នកមិនត្រូវបានកត់ត្រាទាន់ពេលទេ។ សូមព្យាយាមម្តងទៀត។",
  ROUND_NOT_FOUND: "ជុំនេះលែងមានទៀតហើយ។ សូមផ្ទុកទំព័រឡើងវិញ។",
  INVALID_REQUEST: "មិនអាចផ្ញើសន្លឹកឆ្នោតនេះបានទេ។ សូមផ្ទុកទំព័រឡើងវិញ ហើយព្យាយាមម្តងទៀត។",
  UNAUTHENTICATED: "សូមចូលគណនីម្តងទៀត៖ សញ្ញាសម្ងាត់របស់អ្នកបាត់ ឬផុតកំណត់។",
  PERMISSION_DENIED: "គណនីនេះមិនត្រូវបានអនុញ្ញាតឱ្យបោះឆ្នោតទេ។",
  NETWORK: "គ្មានការតភ្ជាប់៖ សន្លឹកឆ្នោតរបស់អ្នកមិនត្រូវបានកត់ត្រាទេ។ សូមពិនិត្យបណ្តាញ ហើយព្យាយាមម្តងទៀត។",
  UNKNOWN: "មានបញ្ហាកើតឡើង សន្លឹកឆ្នោតរបស់អ្នកប្រហែលមិនត្រូវបានកត់ត្រាទេ។ សូមព្យាយាមម្តងទៀត។",
};

const dictionaries: Record<Lang, Record<Key, string>> = { en, km };

export function isKey(value: string): value is Key {
  return value in en;
}

export class I18n {
  constructor(public lang: Lang) {}

  t(key: Key, vars: Record<string, string | number> = {}): string {
    return dictionaries[this.lang][key].replace(/\{(\w+)\}/g, (_, name: string) => String(vars[name] ?? ""));
  }

  /** Fills every [data-i18n] element of the page. */
  apply(root: ParentNode = document): void {
    document.documentElement.lang = this.lang;
    for (const element of root.querySelectorAll<HTMLElement>("[data-i18n]")) {
      const key = element.dataset.i18n ?? "";
      if (isKey(key)) element.textContent = this.t(key);
    }
  }
}

export function initialLang(requested: string | null): Lang {
  const stored = requested ?? localStorage.getItem("televote.lang") ?? navigator.language;
  return stored?.toLowerCase().startsWith("km") ? "km" : "en";
}
