// The buyer page of one sale (/buy/{sale_id}): a client of the JSON API like any other.
// Everything the API returns is put on the page as text (textContent), never as markup.
"use strict";

const SALE_POLL_MS = 1000; // live remaining stock
const HIDDEN_POLL_MS = 5000; // the same while the tab is not shown
const RESERVATION_POLL_MS = 5000; // a pending hold paid or cancelled elsewhere
const TICK_MS = 250; // countdowns
const AUTO_RETRIES = 3; // tries of one purchase after a lost answer, a 503 or a 429
// After an answer, Buy stays disabled this long: the second click of a double click must
// land on a disabled button even when the first answer came back in between.
const COOLDOWN_MS = 1000;
const TOKEN_KEY = "flashsale.buyer-token";

const $ = (id) => document.getElementById(id);
const saleId = decodeURIComponent(location.pathname.split("/").pop() || "");
const salePath = "/v1/sales/" + encodeURIComponent(saleId);
const intentKey = "flashsale.intent." + saleId;

const state = {
  token: "",
  claims: null,
  sale: null, // the last GET /v1/sales answer
  saleMissing: false,
  reservations: new Map(), // reservation_id -> {view, busy, polledAt, item}
  buying: false,
  cooldownUntil: 0,
  shownStatus: "loading", // saleStatus() as last shown
  opened: false, // the sale opened while this page was showing it
};

// ---------------------------------------------------------------- server clock

// The server's clock, learnt from each answer's Date header (whole seconds): every answer
// bounds the offset to an interval; their intersection narrows to well under a second, so
// countdowns do not depend on the buyer's clock being right.
const clock = {
  lo: -Infinity,
  hi: Infinity,
  observe(header, sent, received) {
    const date = Date.parse(header || "");
    if (Number.isNaN(date)) return;
    const lo = date - received;
    const hi = date + 1000 - sent;
    if (Math.max(lo, this.lo) > Math.min(hi, this.hi)) {
      // The local clock jumped (or the server's): start over.
      this.lo = lo;
      this.hi = hi;
    } else {
      this.lo = Math.max(lo, this.lo);
      this.hi = Math.min(hi, this.hi);
    }
  },
  now() {
    return Date.now() + (Number.isFinite(this.lo) ? (this.lo + this.hi) / 2 : 0);
  },
  // The earliest the server's clock can read now (no Date header seen yet: the local
  // clock). A start is passed for sure once this reaches it: the Buy button opens then,
  // never before the server takes purchases (now(), the estimate, may be half a second ahead).
  earliest() {
    return Date.now() + (Number.isFinite(this.lo) ? this.lo : 0);
  },
};

// ---------------------------------------------------------------- formatting

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "long" });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: "long" });

function localTime(iso) {
  const date = new Date(iso);
  const sameDay = new Date().toDateString() === date.toDateString();
  return (sameDay ? timeOnly : dateTime).format(date);
}

function duration(ms) {
  let s = Math.max(0, Math.ceil(ms / 1000));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  s %= 60;
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(s).padStart(2, "0")} s`;
  return `${s} s`;
}

function units(n) {
  return n === 1 ? "1 unit" : `${n} units`;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function setTime(el, iso) {
  setText(el, iso ? localTime(iso) : "");
  if (iso) el.dateTime = iso;
  else el.removeAttribute("datetime");
}

function notice(text) {
  setText($("problem"), "");
  setText($("notice"), text);
}

function problem(text) {
  setText($("notice"), "");
  setText($("problem"), text);
}

// ---------------------------------------------------------------- the API

async function api(method, path, { body, headers = {}, auth = false } = {}) {
  const sent = Date.now();
  const response = await fetch(path, {
    method,
    headers: {
      Accept: "application/json",
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
      ...(auth ? { Authorization: "Bearer " + state.token } : {}),
      ...headers,
    },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  clock.observe(response.headers.get("Date"), sent, Date.now());
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  return { status: response.status, data: data || {}, retryAfter: response.headers.get("Retry-After") };
}

// The words for a refusal, by its problem code; the API's own detail for anything else.
function refusal(answer) {
  const code = answer.data.code;
  const sale = state.sale;
  switch (code) {
    case "sold_out":
      return "Sold out: every unit is taken. Holds that are not paid in time go back on sale, so keep this page open.";
    case "limit_reached":
      return `Limit reached: this sale allows ${sale ? units(sale.per_user_limit) : "a limited quantity"} per buyer, and you already hold or bought that many.`;
    case "sale_not_active":
      if (sale && sale.status === "scheduled") {
        return `Sale not active yet: it opens at ${localTime(sale.starts_at)}.`;
      }
      return "Sale not active: it has ended or been closed.";
    case "sale_not_found":
      return `Sale not found: there is no sale "${saleId}".`;
    case "reservation_expired":
      return "Expired: the time to pay ran out, and the units went back on sale.";
    case "reservation_closed":
      return "This reservation is already closed: it was paid or cancelled.";
    case "reservation_not_found":
      return "That reservation is not yours, or no longer exists.";
    case "unauthorized":
      return `Buyer token refused: ${answer.data.detail || "it is missing or malformed"}. Enter a valid token.`;
    default:
      return `${answer.data.title || "Refused"} (HTTP ${answer.status}): ${answer.data.detail || "no detail"}`;
  }
}

// ---------------------------------------------------------------- the token

function claimsOf(token) {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

function useToken(token) {
  state.token = token.trim();
  state.claims = state.token ? claimsOf(state.token) : null;
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = state.token;
  state.reservations.clear();
  $("reservations").replaceChildren();
  renderToken();
  renderReservations();
  renderBuy();
  if (state.token) loadMine();
}

function tokenExpired() {
  const exp = state.claims && state.claims.exp;
  return typeof exp === "number" && exp * 1000 <= clock.now();
}

function renderToken() {
  const who = $("token-who");
  if (!state.token) {
    setText(who, "No token yet: enter yours to buy.");
  } else if (!state.claims || typeof state.claims.sub !== "string") {
    setText(who, "This does not look like a buyer token (a JWT); the sale will say if it is refused.");
  } else if (tokenExpired()) {
    setText(who, `Buying as ${state.claims.sub}: this token expired at ${localTime(state.claims.exp * 1000)}. Ask for a new one.`);
  } else {
    const until = typeof state.claims.exp === "number" ? `, token valid until ${localTime(state.claims.exp * 1000)}` : "";
    setText(who, `Buying as ${state.claims.sub}${until}.`);
  }
}

function tokenFromFragment() {
  // `flashsale up` / `demo` print this page's address with a token after the #: the
  // fragment never reaches a server, and is taken off the address bar at once.
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token === null) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return token;
}

// ---------------------------------------------------------------- the sale

const poller = { timer: 0, inFlight: false, again: false };

// Polls the sale every SALE_POLL_MS; called directly, it polls now (after this page's own
// purchase, payment or cancel changed the numbers), one request at a time.
async function pollSale() {
  clearTimeout(poller.timer);
  if (poller.inFlight) {
    poller.again = true;
    return;
  }
  poller.inFlight = true;
  try {
    const answer = await api("GET", salePath);
    if (answer.status === 200) {
      state.sale = answer.data;
      state.saleMissing = false;
    } else if (answer.status === 404) {
      state.sale = null;
      state.saleMissing = true;
    }
    $("sale-status").classList.remove("stale");
  } catch {
    // Offline for now: keep showing the last answer, marked as old.
    $("sale-status").classList.add("stale");
  }
  poller.inFlight = false;
  try {
    renderSale();
  } finally {
    // Whatever happened, the page keeps polling.
    if (poller.again) {
      poller.again = false;
      pollSale();
    } else {
      poller.timer = setTimeout(pollSale, document.hidden ? HIDDEN_POLL_MS : SALE_POLL_MS);
    }
  }
}

// The sale's state as the buyer should see it: a scheduled sale whose start has passed on
// the server's clock is open, before the next poll says so.
function saleStatus() {
  const sale = state.sale;
  if (!sale) return state.saleMissing ? "missing" : "loading";
  if (sale.status === "scheduled" && Date.parse(sale.starts_at) <= clock.earliest()) {
    return "active";
  }
  return sale.status;
}

const STATUS_WORDS = {
  loading: "loading…",
  missing: "Sale not found",
  scheduled: "Not started yet",
  active: "On sale",
  sold_out: "Sold out",
  ended: "Ended",
};

function saleNote(status) {
  const sale = state.sale;
  switch (status) {
    case "missing":
      return `Sale not found: there is no sale "${saleId}".`;
    case "scheduled":
      return `Sale not active yet: it opens at ${localTime(sale.starts_at)}.`;
    case "sold_out":
      return "Sold out: every unit is taken. Holds that are not paid in time go back on sale, so keep this page open.";
    case "ended":
      return "Sale not active: it has ended.";
    case "active":
      return state.opened ? "The sale is open." : "";
    default:
      return "";
  }
}

function renderSale() {
  const sale = state.sale;
  const status = saleStatus();
  // Seen scheduled, now open (by the clock, or by a poll that came first): say so once.
  if (status === "active" && state.shownStatus === "scheduled") state.opened = true;
  state.shownStatus = status;
  setText($("sale-status"), STATUS_WORDS[status] || status);
  setText($("remaining"), sale ? String(sale.remaining) : "–");
  setText($("stock"), sale ? String(sale.stock) : "–");
  setTime($("starts-at"), sale ? sale.starts_at : null);
  setTime($("ends-at"), sale ? sale.ends_at : null);
  $("no-end").hidden = !sale || Boolean(sale.ends_at);
  setText($("limit"), sale ? units(sale.per_user_limit) : "–");
  setText($("hold"), sale ? duration(sale.hold_seconds * 1000) + " after you buy" : "–");
  if (sale) $("qty").max = String(sale.per_user_limit);
  setText($("sale-note"), saleNote(status));
  renderCountdown();
  renderBuy();
}

function renderCountdown() {
  const sale = state.sale;
  // Counted down to the moment the Buy button opens (see clock.earliest).
  const left =
    sale && sale.status === "scheduled" ? Date.parse(sale.starts_at) - clock.earliest() : 0;
  setText($("countdown"), left > 0 ? `(starts in ${duration(left)})` : "");
  if (left <= 0 && sale && sale.status === "scheduled" && state.shownStatus === "scheduled") {
    renderSale();
  }
}

// ---------------------------------------------------------------- buying

function heldOrBought() {
  let total = 0;
  for (const entry of state.reservations.values()) {
    if (entry.view.status === "pending" || entry.view.status === "confirmed") total += entry.view.qty;
  }
  return total;
}

function loadIntent() {
  try {
    const intent = JSON.parse(sessionStorage.getItem(intentKey) || "null");
    return intent && typeof intent.key === "string" ? intent : null;
  } catch {
    return null;
  }
}

function saveIntent(intent) {
  if (intent) sessionStorage.setItem(intentKey, JSON.stringify(intent));
  else sessionStorage.removeItem(intentKey);
}

// Why Buy is disabled, or "" when it is not.
function whyNotBuy() {
  const status = saleStatus();
  if (state.buying) return "Reserving…";
  if (status === "missing") return "There is no such sale.";
  if (status === "loading") return "Loading the sale…";
  if (status === "scheduled") return "Buy opens when the sale starts.";
  // A purchase whose answer never came may be retried even now: it may hold a sold unit.
  if (status === "sold_out" && !loadIntent()) return "Sold out.";
  if (status === "ended") return "The sale has ended.";
  if (!state.token) return "Enter your buyer token to buy.";
  if (tokenExpired()) return "Your token has expired.";
  if (state.sale && heldOrBought() >= state.sale.per_user_limit) {
    return `Limit reached: you hold or bought ${units(heldOrBought())}, the most this sale allows per buyer.`;
  }
  if (Date.now() < state.cooldownUntil) return " ";
  return "";
}

function renderBuy() {
  const why = whyNotBuy();
  const intent = loadIntent();
  $("buy").disabled = why !== "";
  setText($("buy"), intent && !state.buying ? "Try again" : "Buy");
  $("qty").disabled = state.buying || intent !== null;
  if (intent) $("qty").value = String(intent.qty);
  setText($("buy-why"), why.trim());
}

async function buy(event) {
  event.preventDefault();
  if ($("buy").disabled || state.buying) return;
  const qty = Number($("qty").value);
  const limit = state.sale ? state.sale.per_user_limit : Infinity;
  if (!Number.isInteger(qty) || qty < 1 || qty > limit) {
    problem(`Quantity must be a whole number from 1 to ${limit}.`);
    $("qty").focus();
    return;
  }
  // One key per purchase intent, kept until the intent has a final answer: a retry (after a
  // lost answer, a 503, a reload) sends it again, and the API answers the reservation it
  // may already have placed instead of placing a second one.
  let intent = loadIntent();
  if (!intent) {
    intent = { key: crypto.randomUUID(), qty };
    saveIntent(intent);
  }
  state.buying = true;
  renderBuy();
  notice("Reserving…");
  try {
    await place(intent);
  } finally {
    state.buying = false;
    state.cooldownUntil = Date.now() + COOLDOWN_MS;
    renderBuy();
    setTimeout(renderBuy, COOLDOWN_MS);
  }
}

async function place(intent) {
  for (let attempt = 0; ; attempt++) {
    let answer = null;
    try {
      answer = await api("POST", salePath + "/reservations", {
        auth: true,
        body: { qty: intent.qty },
        headers: { "Idempotency-Key": intent.key },
      });
    } catch {
      answer = null; // no answer: it may have been placed all the same
    }
    if (answer && answer.status === 202) {
      saveIntent(null);
      const view = { ...answer.data, sale_id: saleId, qty: intent.qty };
      const entry = upsert(view);
      renderReservations();
      announce(entry.view, "placed");
      pollSale();
      return;
    }
    const retryable = answer === null || answer.status === 429 || answer.status >= 500;
    if (!retryable) {
      saveIntent(null);
      problem(refusal(answer));
      pollSale();
      if (answer.status === 401) $("token").focus();
      // Bought elsewhere (another tab, another device): show what the buyer holds.
      if (answer.data.code === "limit_reached") loadMine({ quiet: true });
      return;
    }
    if (attempt >= AUTO_RETRIES) {
      problem("No answer from the sale. Press Try again: it retries the same purchase, which is never made twice.");
      loadMine({ quiet: true }); // a placement that did happen shows meanwhile
      return;
    }
    const seconds = Number(answer && answer.retryAfter) || 0.5 * 2 ** attempt;
    notice(answer ? "The sale is busy: trying again…" : "No answer: trying again…");
    await new Promise((resolve) => setTimeout(resolve, Math.min(seconds, 5) * 1000));
  }
}

// ---------------------------------------------------------------- reservations

async function loadMine({ quiet = false } = {}) {
  const token = state.token;
  let answer;
  try {
    answer = await api("GET", salePath + "/reservations/mine", { auth: true });
  } catch {
    setTimeout(() => state.token === token && loadMine({ quiet }), 2000);
    return;
  }
  if (state.token !== token) return;
  if (answer.status === 200) {
    for (const view of answer.data.reservations || []) upsert(view);
    renderReservations();
    const pending = [...state.reservations.values()].filter((e) => e.view.status === "pending");
    if (pending.length && !quiet) announce(pending[pending.length - 1].view, "found");
  } else if (answer.status === 401) {
    problem(refusal(answer));
  } else if (answer.status >= 500) {
    setTimeout(() => state.token === token && loadMine({ quiet }), 2000);
  }
  renderBuy();
}

function upsert(view) {
  let entry = state.reservations.get(view.reservation_id);
  if (!entry) {
    entry = { view, busy: false, polledAt: Date.now(), item: null };
    state.reservations.set(view.reservation_id, entry);
  } else {
    entry.view = { ...entry.view, ...view };
  }
  return entry;
}

function announce(view, how) {
  switch (view.status) {
    case "pending": {
      const first = how === "found" ? "You hold" : "Reserved";
      notice(`${first} ${units(view.qty)}: pay by ${localTime(view.expires_at)}, or the hold expires.`);
      break;
    }
    case "confirmed":
      notice(`Confirmed: paid, ${units(view.qty)} ${view.qty === 1 ? "is" : "are"} yours.`);
      break;
    case "cancelled":
      notice(`Cancelled: ${units(view.qty)} went back on sale.`);
      break;
    case "expired":
      problem("Expired: the time to pay ran out, and the units went back on sale.");
      break;
    default:
      break;
  }
}

const STATUS_TEXT = {
  pending: "Pending: held for you",
  confirmed: "Confirmed: paid",
  cancelled: "Cancelled",
  expired: "Expired: not paid in time",
};

function itemFor(entry) {
  if (entry.item) return entry.item;
  const id = entry.view.reservation_id;
  const li = document.createElement("li");
  li.className = "reservation";
  const head = document.createElement("p");
  const status = document.createElement("strong");
  status.className = "res-status";
  const what = document.createElement("span");
  what.className = "res-what";
  head.append(status, " ", what);
  const deadline = document.createElement("p");
  deadline.className = "res-deadline";
  const time = document.createElement("time");
  const left = document.createElement("span");
  left.className = "res-left";
  left.setAttribute("role", "timer");
  deadline.append("Pay by ", time, " ", left);
  const actions = document.createElement("p");
  actions.className = "row";
  const pay = document.createElement("button");
  pay.type = "button";
  pay.textContent = "Pay";
  pay.className = "pay";
  pay.addEventListener("click", () => act(entry, "confirm"));
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  cancel.className = "cancel";
  cancel.addEventListener("click", () => act(entry, "cancel"));
  head.id = "res-" + id.replace(/[^A-Za-z0-9-]/g, "");
  pay.setAttribute("aria-describedby", head.id);
  cancel.setAttribute("aria-describedby", head.id);
  actions.append(pay, cancel);
  li.append(head, deadline, actions);
  li.dataset.reservationId = id;
  entry.item = { li, status, what, deadline, time, left, pay, cancel };
  return entry.item;
}

function renderReservations() {
  const list = $("reservations");
  const entries = [...state.reservations.values()];
  for (const entry of entries) {
    const item = itemFor(entry);
    if (item.li.parentNode !== list) list.prepend(item.li); // newest first
    renderReservation(entry);
  }
  $("no-reservations").hidden = entries.length > 0;
}

function renderReservation(entry) {
  const { view } = entry;
  const item = entry.item;
  if (!item) return;
  const pending = view.status === "pending";
  item.li.dataset.status = view.status;
  setText(item.status, STATUS_TEXT[view.status] || view.status);
  setText(item.what, `${units(view.qty)} (reservation ${view.reservation_id})`);
  item.deadline.hidden = !pending;
  item.pay.hidden = !pending;
  item.cancel.hidden = !pending;
  item.pay.disabled = entry.busy;
  item.cancel.disabled = entry.busy;
  if (pending) {
    setTime(item.time, view.expires_at);
    // Measured from the earliest the server's clock can read: "time is up" is said only
    // once the server is sure to refuse the payment (now(), the estimate, may run ahead).
    const left = Date.parse(view.expires_at) - clock.earliest();
    setText(item.left, left > 0 ? `(${duration(left)} left to pay)` : "(time is up)");
  }
}

async function act(entry, action) {
  if (entry.busy) return;
  entry.busy = true;
  renderReservation(entry);
  const hadFocus = document.activeElement;
  try {
    const answer = await api("POST", `/v1/reservations/${encodeURIComponent(entry.view.reservation_id)}/${action}`, { auth: true });
    if (answer.status === 200) {
      entry.view = { ...entry.view, ...answer.data };
      announce(entry.view, action);
      pollSale();
    } else {
      problem(refusal(answer));
      if (answer.data.code === "reservation_expired") entry.view = { ...entry.view, status: "expired" };
      else if (answer.data.code === "reservation_closed") refresh(entry);
    }
  } catch {
    problem("No answer from the sale: press the button again (paying twice is not possible).");
  } finally {
    entry.busy = false;
    renderReservation(entry);
    renderBuy();
    // The buttons of a finished hold disappear: keep the keyboard user's place.
    if (entry.item.pay.hidden && (hadFocus === entry.item.pay || hadFocus === entry.item.cancel)) {
      $("reservations-heading").tabIndex = -1;
      $("reservations-heading").focus();
    }
  }
}

async function refresh(entry) {
  entry.polledAt = Date.now();
  try {
    const answer = await api("GET", `/v1/reservations/${encodeURIComponent(entry.view.reservation_id)}`, { auth: true });
    if (answer.status !== 200) return;
    const before = entry.view.status;
    entry.view = { ...entry.view, ...answer.data };
    renderReservation(entry);
    renderBuy();
    if (before === "pending" && entry.view.status !== "pending") announce(entry.view, "changed");
  } catch {
    // Asked again at the next tick.
  }
}

// Each tick: countdowns, and pending holds looked up now and then, every second once
// their time is up, until the expiry worker has returned them.
function tick() {
  renderCountdown();
  if (state.token && tokenExpired()) renderToken();
  for (const entry of state.reservations.values()) {
    if (entry.view.status !== "pending" || entry.busy) continue;
    renderReservation(entry);
    const overdue = Date.parse(entry.view.expires_at) <= clock.now();
    const every = overdue ? SALE_POLL_MS : RESERVATION_POLL_MS;
    if (Date.now() - entry.polledAt >= every) refresh(entry);
  }
}

// ---------------------------------------------------------------- start

function start() {
  setText($("sale-name"), saleId);
  document.title = `flashsale: buy ${saleId}`;
  setText($("time-zone"), Intl.DateTimeFormat().resolvedOptions().timeZone || "local");
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useToken($("token").value);
    notice(state.token ? "Token saved for this tab." : "Token forgotten.");
  });
  $("forget-token").addEventListener("click", () => {
    useToken("");
    notice("Token forgotten.");
  });
  $("buy-form").addEventListener("submit", buy);
  document.addEventListener("visibilitychange", () => document.hidden || pollSale());
  const fromFragment = tokenFromFragment();
  useToken(fromFragment !== null ? fromFragment : sessionStorage.getItem(TOKEN_KEY) || "");
  pollSale();
  setInterval(tick, TICK_MS);
}

start();
