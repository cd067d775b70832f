// The SolverX dashboard: reads the daemon's JSON APIs and renders them; no build step, no third-party code.
// Every value from the server is put into the page as text (textContent / text nodes), never parsed as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "solverx.apiKey";
  const FAST_POLL_MS = 2000; // health and training progress
  const SLOW_POLL_MS = 10000; // models, adapters, inbox
  const $ = (id) => document.getElementById(id);

  // -- building DOM from data ------------------------------------------------------------------------------

  /** An element; strings among the children become text nodes. Props are literal names chosen here. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child !== undefined && child !== null && child !== false) node.append(child);
    }
    return node;
  }

  /** A table row; a cell that is not already a <td> is wrapped in one. */
  const row = (props, ...cells) =>
    el("tr", props, cells.map((c) => (c instanceof HTMLTableCellElement ? c : el("td", null, c))));
  const num = (text) => el("td", { class: "num" }, text);
  const pill = (text, kind) => el("span", { class: `pill ${kind || text}` }, String(text));
  const muted = (text) => el("p", { class: "muted" }, text);
  const pct = (value) => (typeof value === "number" ? `${Math.round(value * 100)}%` : "–");
  const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "–");

  function bytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function duration(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    if (seconds < 60) return `${Math.round(seconds)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }

  /** A table; headers listed in ``numeric`` are right-aligned like their numbers. */
  function table(headers, rows, cls, numeric = []) {
    const head = headers.map((h) => el("th", { class: numeric.includes(h) ? "num" : null }, h));
    return el("table", { class: cls }, el("thead", null, el("tr", null, head)), el("tbody", null, rows));
  }

  function replace(id, ...children) {
    $(id).replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  }

  // -- the API, with the key when the server wants one ------------------------------------------------------

  class KeyNeeded extends Error {}

  class APIError extends Error {
    constructor(response, body) {
      const message = (body && body.error && body.error.message) || response.statusText || "request failed";
      const id = response.headers.get("X-Request-ID");
      super(`${response.status}: ${message}${id ? ` (request ${id})` : ""}`);
      this.status = response.status;
    }
  }

  async function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...init, headers, cache: "no-store" });
    if (response.status === 401) {
      askForKey(key ? "That key was refused." : "");
      throw new KeyNeeded("an API key is needed");
    }
    return response;
  }

  async function getJSON(path) {
    const response = await api(path);
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new APIError(response, body);
    return body;
  }

  function askForKey(problem) {
    $("key-form").hidden = false;
    $("key-error").hidden = !problem;
    $("key-error").textContent = problem;
    $("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
  }

  function setupKeyForm() {
    $("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("key-input").value = "";
      $("key-form").hidden = true;
      $("forget-key").hidden = false;
      refreshAll();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("forget-key").hidden = true;
      refreshAll();
    });
  }

  /** Run a section's loader; show its failure inside the section instead of breaking the page. */
  async function section(id, load) {
    try {
      await load();
    } catch (error) {
      if (error instanceof KeyNeeded) replace(id, muted("Waiting for the API key…"));
      else if (error.status === 503) replace(id, muted(error.message.replace(/^503: /, "")));
      else replace(id, el("p", { class: "error" }, String(error.message || error)));
    }
  }

  // -- health -----------------------------------------------------------------------------------------------

  async function loadHealth() {
    try {
      const response = await api("/health", { cache: "no-store" });
      const health = await response.json();
      const badge = $("health");
      badge.textContent = health.status;
      badge.className = `pill ${health.status === "ok" ? "ok" : "bad"}`;
      const uptime = duration(health.uptime_s);
      $("load").textContent = `running ${health.running} · waiting ${health.waiting} · up ${uptime}`;
    } catch (error) {
      $("health").textContent = "unreachable";
      $("health").className = "pill bad";
      $("load").textContent = "";
    }
  }

  // -- models and adapters ----------------------------------------------------------------------------------

  const view = { runsByVersion: new Map(), adaptersJSON: "", runsJSON: "", inboxJSON: "" };

  async function loadModels() {
    await section("bases", async () => {
      const models = (await getJSON("/v1/models")).data;
      const bases = models.filter((m) => !m.parent);
      const rows = bases.map((m) => row({ "data-model": m.id }, m.id, when(m.created)));
      replace("bases", table(["id", "created"], rows));
      $("model-names").replaceChildren(...models.map((m) => el("option", { value: m.id })));
      if (!$("chat-model").value && bases.length) $("chat-model").value = bases[0].id;
    });
  }

  async function loadAdapters() {
    await section("adapters", async () => {
      const body = await getJSON("/v1/adapters");
      const fingerprint = JSON.stringify([body, [...view.runsByVersion]]);
      if (fingerprint === view.adaptersJSON) return; // unchanged: keep open reports open
      view.adaptersJSON = fingerprint;
      if (!body.data.length) {
        replace("adapters", muted("No adapters yet. Drop files into the inbox to train one."));
        return;
      }
      replace("adapters", body.data.map(renderAdapter));
    });
  }

  function renderAdapter(adapter) {
    const versions = adapter.versions;
    const byNumber = new Map(versions.map((v) => [v.version, v]));
    const promoted = versions.find((v) => v.status === "promoted");
    const rows = versions
      .slice()
      .reverse()
      .map((v) =>
        el(
          "tr",
          { "data-version": v.id },
          el("td", null, `v${v.version}`),
          el("td", null, pill(v.status)),
          el("td", null, v.stage),
          el("td", null, lineage(v, byNumber)),
          el("td", null, v.created ? new Date(v.created).toLocaleString() : "–"),
          el("td", { class: "num" }, bytes(v.size_bytes)),
          el("td", null, evalSummary(v.eval_report)),
        ),
      );
    const details = versions
      .slice()
      .reverse()
      .map((v) => versionDetails(v))
      .filter(Boolean);
    return el(
      "div",
      { class: "adapter", "data-adapter": adapter.name },
      el(
        "div",
        { class: "title" },
        adapter.name,
        " ",
        promoted ? pill(`serving v${promoted.version}`, "promoted") : pill("not promoted", "candidate"),
      ),
      table(["version", "status", "stage", "lineage", "created", "size", "eval"], rows, null, ["size"]),
      details,
    );
  }

  function lineage(version, byNumber) {
    const chain = [];
    const seen = new Set();
    for (let v = version; v && !seen.has(v.version); v = byNumber.get(v.parent)) {
      seen.add(v.version);
      chain.unshift(`v${v.version} ${v.stage}`);
      if (v.parent === null || v.parent === undefined) break;
    }
    const data = version.data_hash ? ` · data ${version.data_hash.slice(0, 10)}` : "";
    return `${version.base_id} → ${chain.join(" → ")}${data}`;
  }

  function evalSummary(report) {
    if (!report) return "–";
    const cand = (report.rates && report.rates.candidate) || {};
    return el(
      "span",
      null,
      pill(report.passed ? "passed" : "failed", report.passed ? "ok" : "bad"),
      ` domain ${pct(cand.domain_accuracy)} · retention ${pct(cand.retention)} · leakage ${pct(cand.leakage_rate)}`,
    );
  }

  function versionDetails(version) {
    const report = version.eval_report;
    const run = view.runsByVersion.get(`${version.name}@${version.version}`);
    if (!report && !run) return null;
    const parts = [];
    if (report) {
      if (report.reasons && report.reasons.length) parts.push(el("p", { class: "error" }, report.reasons.join("\n")));
      const rates = Object.entries(report.rates || {}).map(([model, r]) =>
        row(null, model, num(pct(r.domain_accuracy)), num(pct(r.retention)), num(pct(r.leakage_rate))),
      );
      const rateNames = ["domain accuracy", "retention", "leakage"];
      parts.push(table(["model", ...rateNames], rates, null, rateNames));
      const qa = (report.table || []).map((line) =>
        row(null, line.set, line.question, line.base, line.fine_tuned),
      );
      if (qa.length) parts.push(table(["set", "question", "base", "fine-tuned"], qa, "eval-table"));
    }
    if (run) parts.push(lossChart(run));
    const title = `v${version.version}: eval report${run ? " and loss curve" : ""}`;
    return el("details", { "data-report": version.id }, el("summary", null, title), parts);
  }

  /** The run's loss.png, fetched with the key (an <img src> could not send it) when first opened. */
  function lossChart(runId) {
    const holder = el("div", { class: "loss-holder" });
    const load = async () => {
      if (holder.dataset.loaded) return;
      holder.dataset.loaded = "1";
      try {
        const response = await api(`/v1/training/${encodeURIComponent(runId)}/loss.png`);
        if (!response.ok) throw new APIError(response, await response.json().catch(() => null));
        const url = URL.createObjectURL(await response.blob());
        holder.replaceChildren(el("img", { class: "loss", alt: `loss curve of run ${runId}`, src: url }));
      } catch (error) {
        holder.replaceChildren(el("p", { class: "muted" }, `No loss curve: ${error.message || error}`));
      }
    };
    const box = el("details", { class: "loss-box" }, el("summary", null, "loss curve"), holder);
    box.addEventListener("toggle", () => box.open && load());
    return box;
  }

  // -- training ---------------------------------------------------------------------------------------------

  async function loadTraining() {
    await section("training-live", async () => {
      const body = await getJSON("/v1/training");
      const runs = body.data;
      const running = runs.filter((r) => r.state === "running");
      const live = running.map(renderLiveRun);
      if (!live.length) live.push(muted("No training run in progress."));
      if (body.queued.length) live.push(el("p", null, `Queued: ${body.queued.join(", ")}`));
      replace("training-live", live);

      view.runsByVersion = new Map(runs.filter((r) => r.version).map((r) => [`${r.adapter}@${r.version}`, r.run_id]));
      const fingerprint = JSON.stringify(runs.map((r) => [r.run_id, r.state, r.stage, r.version, r.error]));
      if (fingerprint === view.runsJSON) return;
      view.runsJSON = fingerprint;
      const rows = runs.map((r) => [
        el(
          "tr",
          { "data-run": r.run_id },
          el("td", null, r.run_id),
          el("td", null, r.adapter || "–"),
          el("td", null, pill(r.state)),
          el("td", null, r.stage || "–"),
          el("td", null, r.version ? `v${r.version}` : "–"),
          el("td", null, runNotes(r)),
        ),
        // a finished run drew its loss chart: a full-width row under the run
        ["succeeded", "rejected"].includes(r.state)
          ? el("tr", { class: "loss-row", "data-loss": r.run_id }, el("td", { colspan: 6 }, lossChart(r.run_id)))
          : null,
      ]);
      const headers = ["run", "adapter", "state", "stage", "version", "notes"];
      replace("training-runs", rows.length ? table(headers, rows) : muted("No runs yet."));
    });
  }

  function renderLiveRun(run) {
    const p = run.progress || {};
    const fraction = p.total ? Math.min(1, p.step / p.total) : 0;
    const fill = el("div");
    fill.style.width = `${(fraction * 100).toFixed(1)}%`; // CSSOM: the page's CSP allows no inline style attributes
    const percent = Math.round(fraction * 100);
    const bar = el("div", { class: "progress", role: "progressbar", "aria-valuenow": percent }, fill);
    const facts = p.total
      ? `${p.stage || run.stage} step ${p.step}/${p.total} · loss ${Number(p.loss).toFixed(3)} · ` +
        `${Math.round(p.tokens_per_second)} tok/s · ETA ${duration(p.eta_seconds)}`
      : `${run.stage || "starting"}…`;
    return el(
      "div",
      { class: "live-run", "data-run": run.run_id },
      el("div", null, el("strong", null, run.adapter), ` ${run.run_id}`),
      bar,
      el("div", { class: "muted" }, facts),
    );
  }

  function runNotes(run) {
    const notes = [];
    if (run.error) notes.push(el("pre", { class: "error" }, run.error));
    if (run.reasons && run.reasons.length) notes.push(el("div", null, run.reasons.join("; ")));
    const quarantined = (run.quarantined || []).length;
    if (quarantined) notes.push(el("div", { class: "muted" }, `${quarantined} file(s) quarantined`));
    return notes;
  }

  // -- inbox and quarantine ---------------------------------------------------------------------------------

  async function loadInbox() {
    await section("inbox", async () => {
      const body = await getJSON("/v1/inbox");
      const fingerprint = JSON.stringify(body);
      if (fingerprint === view.inboxJSON) return;
      view.inboxJSON = fingerprint;
      const folders = body.inbox.map((folder) =>
        el(
          "div",
          { class: "adapter", "data-inbox": folder.adapter },
          el("div", { class: "title" }, folder.adapter, folder.valid ? "" : " (ignored: not a valid adapter name)"),
          folder.files.length
            ? table(
                ["file", "size", "modified"],
                folder.files.map((f) => row(null, f.path, num(bytes(f.size)), when(f.mtime))),
                null,
                ["size"],
              )
            : muted("empty"),
          folder.more ? muted(`… and ${folder.more} more`) : null,
        ),
      );
      const empty = muted(`The inbox is empty. Put files in ${body.root}/<adapter>/ to train.`);
      replace("inbox", folders.length ? folders : empty);
      const items = body.quarantine.map((q) =>
        el(
          "tr",
          { "data-quarantined": q.path },
          el("td", null, q.adapter),
          el("td", null, q.run),
          el("td", null, q.path, q.copied ? "" : el("div", { class: "muted" }, "(not copied)")),
          el("td", null, el("pre", null, q.reason)),
        ),
      );
      replace(
        "quarantine",
        items.length ? table(["adapter", "run", "file", "reason"], items) : muted("Nothing quarantined."),
        body.quarantine_more ? muted(`… and ${body.quarantine_more} older entries`) : null,
      );
    });
  }

  // -- chat -------------------------------------------------------------------------------------------------

  const chat = { history: [], controller: null };

  function addMessage(role, text, model) {
    const body = el("span", { class: "body" }, text);
    const who = el("span", { class: "who" }, role === "user" ? "you" : model);
    const node = el("div", { class: `msg ${role}` }, who, body);
    $("chat-log").append(node);
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
    return node;
  }

  /** Call ``onEvent`` with each parsed ``data:`` event of a server-sent-event response, until [DONE]. */
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }

  async function sendChat(event) {
    event.preventDefault();
    const model = $("chat-model").value.trim();
    const text = $("chat-input").value.trim();
    if (!model || !text || chat.controller) return;
    $("chat-input").value = "";
    chat.history.push({ role: "user", content: text });
    addMessage("user", text);
    const answer = addMessage("assistant", "", model);
    const answerBody = answer.querySelector(".body");
    answer.dataset.state = "streaming";
    answer.dataset.chunks = "0";
    chat.controller = new AbortController();
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    $("chat-stats").textContent = "";
    const started = performance.now();
    let firstAt = null;
    let usage = null;
    try {
      const maxTokens = parseInt($("chat-max").value, 10);
      const temperature = parseFloat($("chat-temp").value);
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          model,
          messages: chat.history,
          stream: true,
          stream_options: { include_usage: true },
          ...(maxTokens > 0 ? { max_tokens: maxTokens } : {}),
          ...(temperature >= 0 ? { temperature } : {}),
        }),
        signal: chat.controller.signal,
      });
      if (!response.ok) throw new APIError(response, await response.json().catch(() => null));
      await readEvents(response, (data) => {
        if (data.error) throw new Error(data.error.message || "the stream failed");
        if (data.usage) usage = data.usage;
        const delta = data.choices && data.choices[0] && data.choices[0].delta;
        if (delta && delta.content) {
          if (firstAt === null) firstAt = performance.now();
          answerBody.append(delta.content);
          answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        }
      });
      answer.dataset.state = "done";
      if (!answerBody.textContent) {
        // a tiny model may end its answer at once; say so rather than show an empty bubble
        answer.append(el("span", { class: "note" }, "(the model ended its answer without text)"));
      }
      chat.history.push({ role: "assistant", content: answerBody.textContent });
      $("chat-stats").textContent = chatStats(usage, started, firstAt);
    } catch (error) {
      if (error.name === "AbortError") {
        answer.dataset.state = "stopped";
        chat.history.push({ role: "assistant", content: answerBody.textContent });
      } else {
        answer.dataset.state = "error";
        answerBody.append(answerBody.textContent ? "\n" : "", String(error.message || error));
        chat.history.pop(); // the question was not answered; do not send it again
      }
    } finally {
      chat.controller = null;
      $("chat-send").disabled = false;
      $("chat-stop").disabled = true;
    }
  }

  function chatStats(usage, started, firstAt) {
    const now = performance.now();
    const parts = [];
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    if (firstAt !== null) parts.push(`first token ${((firstAt - started) / 1000).toFixed(2)} s`);
    if (usage && firstAt !== null && now > firstAt && usage.completion_tokens > 1) {
      parts.push(`${Math.round((usage.completion_tokens - 1) / ((now - firstAt) / 1000))} tok/s`);
    }
    return parts.join(" · ");
  }

  function setupChat() {
    $("chat-form").addEventListener("submit", sendChat);
    $("chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
    $("chat-clear").addEventListener("click", () => {
      if (chat.controller) chat.controller.abort();
      chat.history = [];
      $("chat-log").replaceChildren();
      $("chat-stats").textContent = "";
    });
    $("chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-form").requestSubmit();
    });
  }

  // -- polling ----------------------------------------------------------------------------------------------

  async function refreshFast() {
    await Promise.all([loadHealth(), loadTraining()]);
  }

  async function refreshSlow() {
    await loadTraining(); // the adapters' loss curves come from the runs
    await Promise.all([loadModels(), loadAdapters(), loadInbox()]);
  }

  function refreshAll() {
    view.adaptersJSON = view.runsJSON = view.inboxJSON = "";
    return Promise.all([loadHealth(), refreshSlow()]);
  }

  function every(ms, task) {
    let busy = false;
    setInterval(async () => {
      if (busy || document.visibilityState === "hidden") return;
      busy = true;
      try {
        await task();
      } finally {
        busy = false;
      }
    }, ms);
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupKeyForm();
    setupChat();
    $("refresh").addEventListener("click", refreshAll);
    refreshAll().finally(() => {
      document.body.dataset.ready = "1";
    });
    every(FAST_POLL_MS, refreshFast);
    every(SLOW_POLL_MS, refreshSlow);
  });
})();
