// The operator console: asks for the admin token (kept in sessionStorage, for this tab
// only), then polls the admin API every second and renders what it answers. Every text
// that comes from the API is put in with textContent, never parsed as HTML.

const TOKEN_KEY = "flashsale.adminToken";
const POLL_MS = 1000;
// The last verify result is read again this often (another operator may have run one).
const VERIFY_POLL_MS = 5000;
const COUNTERS = ["stock", "remaining", "held", "confirmed", "released"];

const $ = (id) => document.getElementById(id);

/** An answer of the API that is not a success, with its problem+json body. */
class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

/** Call the API as the admin; the body of a success, else throws ApiError. */
async function api(method, path, body, key) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (key !== undefined) headers["Idempotency-Key"] = key;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, {
      title: "No answer",
      detail: `the API did not answer (${error.message})`,
      code: "network",
    });
  }
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    throw new ApiError(
      response.status,
      data && typeof data === "object" ? data : { title: response.statusText, detail: "" },
    );
  }
  return data;
}

// ------------------------------------------------------------------ small DOM helpers

/** Set an element's text, only when it changed (screen readers hear changes only). */
function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

function cell(tag, text, className) {
  const element = document.createElement(tag);
  if (text !== undefined) element.textContent = text;
  if (className) element.className = className;
  return element;
}

/** A <time> showing ``iso`` in the browser's time zone and locale. */
function timeElement(iso) {
  const element = document.createElement("time");
  element.dateTime = iso;
  element.textContent = localTime(iso);
  return element;
}

function localTime(iso) {
  return new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  return `${value.toFixed(1)} s`;
}

const numbers = new Intl.NumberFormat();

/** "1 sale", "3 sales". */
function count(n, noun, nouns = `${noun}s`) {
  return `${numbers.format(n)} ${n === 1 ? noun : nouns}`;
}

// ------------------------------------------------------------------ messages

/** Show the answer of an action: a problem (title, detail, code, field errors) or a note. */
function showProblem(error, where = $("message")) {
  const problem = error instanceof ApiError ? error.problem : { title: "Error", detail: String(error) };
  where.replaceChildren();
  where.classList.add("error");
  where.classList.remove("done");
  where.append(cell("strong", problem.title || "Error"));
  if (problem.detail && problem.detail !== problem.title) {
    where.append(document.createTextNode(`: ${problem.detail}`));
  }
  if (problem.code) {
    where.append(document.createTextNode(" ("), cell("code", String(problem.code)), ")");
  }
  if (Array.isArray(problem.errors) && problem.errors.length) {
    const list = document.createElement("ul");
    for (const item of problem.errors) {
      const place = Array.isArray(item.loc) ? item.loc.join(".") : "";
      list.append(cell("li", place ? `${place}: ${item.msg}` : String(item.msg)));
    }
    where.append(list);
  }
  where.hidden = false;
}

function showDone(text) {
  const box = $("message");
  box.replaceChildren(document.createTextNode(text));
  box.classList.add("done");
  box.classList.remove("error");
  box.hidden = false;
}

// ------------------------------------------------------------------ sales

const saleRows = new Map();

function saleRow(saleId) {
  const tr = document.createElement("tr");
  tr.dataset.saleId = saleId;
  const cells = { sale: cell("th", saleId) };
  cells.sale.scope = "row";
  cells.status = cell("td", "", "status");
  for (const name of COUNTERS) cells[name] = cell("td", "", "num");
  cells.starts = cell("td");
  cells.ends = cell("td");
  const actions = cell("td");
  const change = cell("button", "Change");
  change.type = "button";
  change.setAttribute("aria-label", `Change sale ${saleId}`);
  change.addEventListener("click", () => {
    $("change-sale").value = saleId;
    $("change-delta").focus();
  });
  actions.append(change);
  tr.append(cells.sale, cells.status, ...COUNTERS.map((n) => cells[n]), cells.starts, cells.ends, actions);
  return { tr, cells, starts: null, ends: undefined };
}

function renderSales(list) {
  const body = $("sales").tBodies[0];
  const seen = new Set();
  list.sales.forEach((sale, index) => {
    seen.add(sale.sale_id);
    let row = saleRows.get(sale.sale_id);
    if (!row) {
      row = saleRow(sale.sale_id);
      saleRows.set(sale.sale_id, row);
    }
    if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] || null);
    setText(row.cells.status, sale.status.replace("_", " "));
    row.cells.status.dataset.status = sale.status;
    for (const name of COUNTERS) setText(row.cells[name], numbers.format(sale[name]));
    if (row.starts !== sale.starts_at) {
      row.starts = sale.starts_at;
      row.cells.starts.replaceChildren(timeElement(sale.starts_at));
    }
    if (row.ends !== sale.ends_at) {
      row.ends = sale.ends_at;
      row.cells.ends.replaceChildren(sale.ends_at ? timeElement(sale.ends_at) : "never");
    }
  });
  for (const [saleId, row] of saleRows) {
    if (!seen.has(saleId)) {
      row.tr.remove();
      saleRows.delete(saleId);
    }
  }
  $("no-sales").hidden = list.sales.length > 0;
  $("truncated").hidden = !list.truncated;
  const ids = $("sale-ids");
  const known = [...ids.options].map((o) => o.value).join("\n");
  const now = list.sales.map((s) => s.sale_id);
  if (known !== now.join("\n")) {
    ids.replaceChildren(...now.map((id) => Object.assign(document.createElement("option"), { value: id })));
  }
}

// ------------------------------------------------------------------ overview

let lastTotals = null;

function renderAttempts(attempts, at) {
  const rates = {};
  if (lastTotals) {
    const elapsed = (at - lastTotals.at) / 1000;
    for (const [outcome, total] of Object.entries(attempts)) {
      const grew = total - (lastTotals.totals[outcome] || 0);
      // A worker restarted (its counts began again): no rate for this reading.
      rates[outcome] = elapsed > 0 && grew >= 0 ? grew / elapsed : null;
    }
  }
  lastTotals = { at, totals: attempts };
  const outcomes = Object.keys(attempts).sort((a, b) =>
    a === "placed" ? -1 : b === "placed" ? 1 : a.localeCompare(b),
  );
  const body = $("attempts").tBodies[0];
  body.replaceChildren(
    ...outcomes.map((outcome) => {
      const tr = document.createElement("tr");
      const head = cell("th", outcome.replaceAll("_", " "));
      head.scope = "row";
      const rate = rates[outcome];
      tr.append(
        head,
        cell("td", rate === undefined || rate === null ? "-" : rate.toFixed(1), "num"),
        cell("td", numbers.format(attempts[outcome]), "num"),
      );
      return tr;
    }),
  );
  $("no-attempts").hidden = outcomes.length > 0;
}

function renderConsumers(consumers) {
  if (!consumers.readable) {
    setText($("total-lag"), "unknown (Redis unreadable)");
    setText($("oldest-pending"), "-");
    setText($("dead-letters"), "-");
  } else {
    setText($("total-lag"), numbers.format(consumers.lag));
    setText($("oldest-pending"), seconds(consumers.oldest_pending_seconds));
    setText($("dead-letters"), numbers.format(consumers.dead_letters));
  }
  $("dead-letters").classList.toggle("alarm", Boolean(consumers.dead_letters));
  const body = $("partitions").tBodies[0];
  body.replaceChildren(
    ...consumers.groups.map((g) => {
      const tr = document.createElement("tr");
      const head = cell("th", String(g.partition), "num");
      head.scope = "row";
      tr.append(
        head,
        cell("td", g.group),
        cell("td", String(g.consumers), "num"),
        cell("td", numbers.format(g.lag), "num"),
        cell("td", numbers.format(g.pending), "num"),
        cell("td", seconds(g.oldest_pending_seconds), "num"),
      );
      return tr;
    }),
  );
  $("no-groups").hidden = consumers.groups.length > 0;
}

// ------------------------------------------------------------------ verify

function renderVerify(result) {
  const summary = $("verify-summary");
  const table = $("verify-rows");
  if (!result) {
    setText(summary, "No verify has run yet.");
    table.hidden = true;
    return;
  }
  summary.replaceChildren();
  const verdict = cell("strong", result.clean ? "Clean" : "Drift", result.clean ? "clean" : "drift");
  const checked = `${count(result.sales, "sale")}, ${count(result.events, "event")}`;
  let said = result.clean
    ? `: ${checked} agree in the log, Redis and PostgreSQL`
    : `: ${count(result.differences, "difference")} (${checked} checked)`;
  if (result.lagging) said += `, ${count(result.lagging, "event")} not projected yet`;
  if (result.malformed) said += `, ${count(result.malformed, "log entry", "log entries")} skipped`;
  summary.append(verdict, document.createTextNode(`${said}. Finished `));
  summary.append(timeElement(result.finished_at), document.createTextNode(` in ${result.seconds} s.`));
  const body = table.tBodies[0];
  body.replaceChildren(
    ...result.rows.map((row) => {
      const tr = document.createElement("tr");
      const head = cell("th", row.sale_id);
      head.scope = "row";
      tr.append(head, ...[row.stores, row.field, row.log, row.redis, row.postgres].map((t) => cell("td", t)));
      return tr;
    }),
  );
  table.hidden = result.rows.length === 0;
}

async function readVerify() {
  const answer = await api("GET", "/v1/admin/verify");
  renderVerify(answer.last);
}

async function runVerify() {
  const button = $("run-verify");
  // Marked busy rather than disabled: a disabled button would lose the keyboard focus.
  if (button.getAttribute("aria-disabled") === "true") return;
  button.setAttribute("aria-disabled", "true");
  setText(button, "Verifying…");
  try {
    const result = await api("POST", "/v1/admin/verify");
    renderVerify(result);
    showDone(result.clean ? "Verify finished: clean." : "Verify finished: drift found.");
  } catch (error) {
    failed(error);
  } finally {
    button.removeAttribute("aria-disabled");
    setText(button, "Run verify");
  }
}

// ------------------------------------------------------------------ actions

/** A whole number typed in ``input``, or undefined when left empty. */
function whole(input) {
  const text = input.value.trim();
  return text === "" ? undefined : Number(text);
}

/** A datetime-local value (the browser's time zone) as an RFC 3339 UTC time. */
function moment(input) {
  return input.value ? new Date(input.value).toISOString() : undefined;
}

/** The Idempotency-Key of a write from ``form``: the same while the form sends the same
 * body, so that sending it again after no answer (or a 503) does the write once; a new one
 * for another body, and after a success (the same restock typed again is a new one). */
function keyFor(form, body) {
  const text = JSON.stringify(body);
  if (form.dataset.keyBody !== text) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    form.dataset.key = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
    form.dataset.keyBody = text;
  }
  return form.dataset.key;
}

function forgetKey(form) {
  delete form.dataset.key;
  delete form.dataset.keyBody;
}

async function createSale(form) {
  const body = { sale_id: form.sale_id.value.trim(), stock: whole(form.stock) };
  for (const [name, value] of [
    ["per_user_limit", whole(form.per_user_limit)],
    ["hold_seconds", whole(form.hold_seconds)],
    ["starts_at", moment(form.starts_at)],
    ["ends_at", moment(form.ends_at)],
  ]) {
    if (value !== undefined) body[name] = value;
  }
  const sale = await api("POST", "/v1/sales", body, keyFor(form, body));
  forgetKey(form);
  showDone(`Sale ${sale.sale_id} created with ${numbers.format(sale.stock)} in stock.`);
  form.sale_id.value = "";
  form.stock.value = "";
}

async function changeSale(form, action) {
  const saleId = form.sale_id.value.trim();
  const path = `/v1/sales/${encodeURIComponent(saleId)}`;
  if (action === "close") {
    if (!window.confirm(`Close sale ${saleId}? It stops taking reservations now.`)) return;
    const sale = await api("POST", `${path}/close`);
    showDone(sale.changed ? `Sale ${sale.sale_id} closed.` : `Sale ${sale.sale_id} was closed already.`);
    return;
  }
  const delta = whole(form.delta);
  if (delta === undefined) {
    showProblem(new ApiError(0, { title: "Stock change missing", detail: "type how much to add or withdraw" }));
    form.delta.focus();
    return;
  }
  const sale = await api("POST", `${path}/stock`, { delta }, keyFor(form, { saleId, delta }));
  forgetKey(form);
  const verb = delta > 0 ? `Added ${numbers.format(delta)} to` : `Withdrew ${numbers.format(-delta)} from`;
  showDone(`${verb} sale ${sale.sale_id}: ${numbers.format(sale.remaining)} remaining.`);
  form.delta.value = "";
}

/** Run ``work`` for a submitted form, once at a time (its buttons marked busy, not
 * disabled, so the keyboard focus stays where it was); errors are shown. */
async function submitting(form, work) {
  if (form.dataset.busy) return;
  form.dataset.busy = "true";
  const buttons = [...form.querySelectorAll("button")];
  for (const button of buttons) button.setAttribute("aria-disabled", "true");
  try {
    await work();
    poll();
  } catch (error) {
    failed(error);
  } finally {
    delete form.dataset.busy;
    for (const button of buttons) button.removeAttribute("aria-disabled");
  }
}

// ------------------------------------------------------------------ the session

let pollTimer = null;
let verifyReadAt = 0;

function failed(error) {
  if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
    signOut();
  }
  showProblem(error);
}

let polling = false;
let pollAgain = false;

/** Read the sales and the overview (and now and then the last verify) and show them; then
 * again in a second. A call while a reading is under way asks for one right after it. */
async function poll() {
  if (polling) {
    pollAgain = true;
    return;
  }
  clearTimeout(pollTimer);
  if (!token()) return;
  polling = true;
  const problemBox = $("poll-problem");
  try {
    // Each part is shown when it comes back; the first refusal is shown beside them
    // (the list of sales needs the database, the overview does not).
    const [sales, overview] = await Promise.all([
      api("GET", "/v1/sales").catch((error) => error),
      api("GET", "/v1/admin/overview").catch((error) => error),
    ]);
    if (!(sales instanceof Error)) renderSales(sales);
    if (!(overview instanceof Error)) {
      renderAttempts(overview.attempts, Date.parse(overview.at));
      renderConsumers(overview.consumers);
    }
    if (Date.now() - verifyReadAt > VERIFY_POLL_MS) {
      verifyReadAt = Date.now();
      await readVerify();
    }
    for (const answer of [sales, overview]) if (answer instanceof Error) throw answer;
    problemBox.hidden = true;
    setText($("updated"), `Updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      polling = false;
      failed(error);
      return;
    }
    showProblem(error, problemBox);
  } finally {
    polling = false;
  }
  if (token()) pollTimer = setTimeout(poll, pollAgain ? 0 : POLL_MS);
  pollAgain = false;
}

function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-form").hidden = true;
  $("console").hidden = false;
  lastTotals = null;
  verifyReadAt = 0;
  poll();
}

function signOut() {
  clearTimeout(pollTimer);
  sessionStorage.removeItem(TOKEN_KEY);
  $("console").hidden = true;
  $("token-form").hidden = false;
  $("admin-token").value = "";
  $("admin-token").focus();
}

function start() {
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("admin-token").value.trim();
    if (!value) return;
    $("message").hidden = true;
    signIn(value);
    $("console-title").focus();
  });
  $("forget").addEventListener("click", () => {
    signOut();
    showDone("The token is forgotten.");
  });
  $("create-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitting(event.target, () => createSale(event.target));
  });
  $("change-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const action = event.submitter ? event.submitter.value : "stock";
    submitting(event.target, () => changeSale(event.target, action));
  });
  $("run-verify").addEventListener("click", runVerify);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });
  if (token()) signIn(token());
  else $("admin-token").focus();
}

start();
