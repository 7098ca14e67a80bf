// qhx-server console: plain JavaScript, no build step, no dependencies (docs/console.md).
//
// Rules this file keeps:
// * it is a client of the public API only (/v1/models, /v1/devices/events, /v1/requests,
//   /v1/chat/completions, /v1/completions), with the same API key as any client;
// * the key lives in sessionStorage and goes out only as an Authorization header, never in a URL;
// * text from the server (model output, errors, phone names) reaches the page only as text
//   (textContent, Text nodes): never innerHTML, never an attribute that runs code.
"use strict";

(() => {
  const KEY_STORAGE = "qhx.apiKey";
  const RECONNECT_MAX_MS = 8000;
  const REQUESTS_LIMIT = 300;
  const REQUESTS_POLL_MS = 1500;
  const REQUESTS_TIMEOUT_MS = 20000; // a poll the server has not answered by then is given up (the next goes out)
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- small helpers

  /** An element with attributes (class, text, or any attribute) and children (strings become text). */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  /** Makes `node`'s children look like `fresh` (nodes not in the page), changing only what differs:
   * a text or an element that stays the same stays in place, so that a selection (a serial, an error
   * to copy), a focus or a hover outlives an update several times a second. */
  function patchChildren(node, fresh) {
    const old = [...node.childNodes];
    fresh.forEach((next, i) => {
      const have = old[i];
      if (!have) {
        node.append(next);
      } else if (have.nodeType !== next.nodeType || have.nodeName !== next.nodeName
                 || have.namespaceURI !== next.namespaceURI) {
        node.replaceChild(next, have);
      } else if (have.nodeType === Node.ELEMENT_NODE) {
        patchAttributes(have, next);
        patchChildren(have, [...next.childNodes]);
      } else if (have.nodeValue !== next.nodeValue) {
        have.nodeValue = next.nodeValue;
      }
    });
    for (const extra of old.slice(fresh.length)) extra.remove();
  }

  function patchAttributes(node, next) {
    for (const name of node.getAttributeNames()) if (!next.hasAttribute(name)) node.removeAttribute(name);
    for (const name of next.getAttributeNames()) {
      const value = next.getAttribute(name);
      if (node.getAttribute(name) !== value) node.setAttribute(name, value);
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const num = (v, digits = 0) => (typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "–");
  const clockTime = (unix) => new Date(unix * 1000).toLocaleTimeString([], { hour12: false });

  function duration(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function ago(unix) {
    return `${duration(Date.now() / 1000 - unix)} ago`;
  }

  function ms(v) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    return v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(2)} s`;
  }

  // ---------------------------------------------------------------- API key and fetch

  class AuthError extends Error {}

  const auth = {
    key: () => sessionStorage.getItem(KEY_STORAGE) || "",
    needed: false,
    waiting: null, // the promise of a key being entered
  };

  function authHeaders() {
    const key = auth.key();
    return key && !keyProblem(key) ? { Authorization: `Bearer ${key}` } : {};
  }

  /** Why a key cannot be sent, or "": a browser sends header values in ISO-8859-1 only (anything else
   * makes fetch() throw), and the server takes printable ASCII keys (server/settings.py). */
  function keyProblem(key) {
    const bad = [...key].find((c) => c < " " || c > "~");
    return bad === undefined ? ""
      : `An API key is printable ASCII only (letters, digits, punctuation): this one has “${bad}”.`;
  }

  /** fetch() with the key; a 401 asks for a key and throws AuthError. */
  async function api(path, options = {}) {
    const response = await fetch(path, {
      ...options,
      headers: { ...(options.headers || {}), ...authHeaders() },
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
    if (response.status === 401) {
      const body = await response.json().catch(() => null);
      askForKey(auth.key() ? "That key was not accepted." : (body && body.error && body.error.message) || "");
      throw new AuthError("API key needed");
    }
    return response;
  }

  /** The error message of an error response (OpenAI's envelope), or its status. */
  async function errorMessage(response) {
    const body = await response.json().catch(() => null);
    const message = body && body.error && body.error.message;
    return `${response.status}: ${message || response.statusText || "error"}`;
  }

  function askForKey(message) {
    auth.needed = true;
    $("key-button").hidden = false;
    const dialog = $("key-dialog");
    const error = $("key-error");
    error.textContent = message || "";
    error.hidden = !message || !auth.key();
    if (!dialog.open) {
      $("key-input").value = "";
      dialog.showModal();
      $("key-input").focus();
    }
    setConnection("error", "API key needed");
  }

  function keyChanged() {
    events.restart();
    playground.loadModels();
    requests.load(true);
  }

  function setupKeyDialog() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      const problem = keyProblem(key);
      if (problem) {
        $("key-error").textContent = problem;
        $("key-error").hidden = false;
        return;
      }
      sessionStorage.setItem(KEY_STORAGE, key);
      $("key-dialog").close();
      keyChanged();
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("key-input").value = "";
      $("key-error").hidden = true;
      $("key-dialog").close();
      keyChanged();
    });
    $("key-button").addEventListener("click", () => {
      $("key-error").hidden = true;
      $("key-input").value = "";
      $("key-dialog").showModal();
      $("key-input").focus();
    });
    $("key-button").hidden = !auth.key();
  }

  // ---------------------------------------------------------------- server-sent events over fetch

  /** Calls onData(text) for each `data:` event of an SSE response, until it ends. */
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) onData(data);
      }
    }
  }

  function setConnection(state, text) {
    const node = $("conn");
    node.dataset.state = state;
    node.textContent = text;
  }

  // ---------------------------------------------------------------- the farm

  const STATE_LABEL = {
    ready: "ready", busy: "busy", starting: "starting", restarting: "restarting",
    quarantined: "quarantined", incompatible: "incompatible", offline: "gone",
  };
  // PhoneHealth fields shown in their own places; any other field (telemetry) is listed as it comes
  const KNOWN = new Set([
    "serial", "adb_server", "state", "model", "product_model", "soc", "bundles", "bundle", "mode",
    "request_in_flight", "tokens_served", "last_decode_tps", "last_error", "uptime_s", "simulated",
    "failures", "retry_in_s", "state_tokens", "checkpoint_slots", "checkpoints_used", "live_tps",
    "tps_history", "last_error_at",
    // phone telemetry (shown when the server reads it; older servers do not send these)
    "thermal_status", "temperature_c", "battery_level", "charging", "battery_temperature_c", "decode_tps",
    "drained", "telemetry_age_s", "telemetry_error",
  ]);
  const THERMAL = ["none", "light", "moderate", "severe", "critical", "emergency", "shutdown"];

  const farm = {
    snapshot: null,
    receivedAt: 0, // performance.now() when the snapshot arrived: clocks run on from there
    cards: new Map(), // phone key -> card element
  };

  function phoneKey(p) {
    return `${p.adb_server}/${p.serial}`;
  }

  function onSnapshot(snapshot) {
    farm.snapshot = snapshot;
    farm.receivedAt = performance.now();
    renderQueues(snapshot.queues || []);
    renderPhones(snapshot.data || []);
    requests.phonesChanged(snapshot.data || []);
    tickClocks();
  }

  function sinceSnapshot() {
    return (performance.now() - farm.receivedAt) / 1000;
  }

  function renderQueues(queues) {
    const box = $("queues");
    patchChildren(box, queues.map((q) => {
        const item = el("div", { class: `queue${q.waiting ? " waiting" : ""}`, "data-model": q.model });
        item.append(
          el("span", { class: "q-model", text: q.model }),
          el("span", {}, el("span", { class: "q-num", "data-role": "waiting", text: String(q.waiting) }), " ",
            el("span", { class: "q-label", text: "waiting" })),
          el("span", {}, el("span", { class: "q-num", "data-role": "oldest", "data-base": q.oldest_wait_s,
            "data-running": q.waiting ? "1" : "0", text: q.waiting ? duration(q.oldest_wait_s) : "–" }), " ",
            el("span", { class: "q-label", text: "longest wait" })),
          el("span", {}, el("span", { class: "q-num", text: `${q.serving}/${q.phones}` }), " ",
            el("span", { class: "q-label", text: "phones serving" })),
        );
        return item;
    }));
  }

  function renderPhones(phones) {
    const list = $("phones");
    $("farm-empty").hidden = phones.length > 0;
    const seen = new Set();
    phones.forEach((p, index) => {
      const key = phoneKey(p);
      seen.add(key);
      let card = farm.cards.get(key);
      if (!card) {
        card = el("li", { class: "card", "data-key": key });
        farm.cards.set(key, card);
      }
      fillCard(card, p);
      if (list.children[index] !== card) list.insertBefore(card, list.children[index] || null);
    });
    for (const [key, card] of farm.cards) {
      if (!seen.has(key)) {
        card.remove();
        farm.cards.delete(key);
      }
    }
  }

  function fillCard(card, p) {
    card.dataset.state = p.state;
    card.dataset.serial = p.serial;
    card.phone = p;
    const label = STATE_LABEL[p.state] || p.state;
    const head = el("div", { class: "card-head" },
      el("span", { class: "serial mono", text: p.serial }),
      el("span", { class: "badge", "data-state": p.state, "data-role": "state", text: label }));
    const sub = el("div", { class: "sub" },
      [p.product_model, p.soc].filter(Boolean).join(" · ") || p.adb_server,
      el("span", { class: "tag", text: p.simulated ? "simulated" : "real phone" }));

    const facts = el("dl", { class: "facts" });
    const fact = (name, value, role) => {
      facts.append(el("dt", { text: name }), el("dd", { text: value, "data-role": role }));
    };
    fact("Model", p.model ? `${p.model}${p.bundle ? ` (bundle ${p.bundle})` : ""}` : "–", "model");
    if (p.mode) fact("Runtime", p.mode, "mode");
    fact("Tokens served", (p.tokens_served || 0).toLocaleString(), "tokens");
    fact("Last decode", p.last_decode_tps ? `${num(p.last_decode_tps, 1)} tok/s` : "–", "last-tps");
    if (p.state === "ready" || p.state === "busy") fact("Up", duration(p.uptime_s), "uptime");
    if (p.checkpoint_slots) fact("Checkpoints", `${p.checkpoints_used}/${p.checkpoint_slots} used`, "checkpoints");
    if (typeof p.decode_tps === "number") fact("Decode rate", `${num(p.decode_tps, 1)} tok/s (recent)`, "decode-rate");
    const present = p.state !== "offline"; // a gone phone's last readings are not news
    if (present && (typeof p.temperature_c === "number" || typeof p.thermal_status === "number")) {
      const status = typeof p.thermal_status === "number" ? THERMAL[p.thermal_status] || String(p.thermal_status) : null;
      const temp = typeof p.temperature_c === "number" ? `${num(p.temperature_c, 1)} °C` : null;
      fact("Thermal", [temp, status && `status ${status}`].filter(Boolean).join(", "), "thermal");
    }
    if (present && typeof p.battery_level === "number") {
      const charge = p.charging === true ? "charging" : p.charging === false ? "not charging" : null;
      const temp = typeof p.battery_temperature_c === "number" ? `${num(p.battery_temperature_c, 1)} °C` : null;
      fact("Battery", [`${num(p.battery_level)} %`, charge, temp].filter(Boolean).join(", "), "battery");
    }
    if (p.telemetry_error) fact("Health read", `failed: ${p.telemetry_error}`, "telemetry-error");
    for (const [name, value] of extraFields(p)) fact(name, value, "extra");

    const parts = [head, sub, stateNote(p), inFlight(p), facts, sparkline(p.tps_history || []), lastError(p)];
    patchChildren(card, parts.filter(Boolean));
  }

  /** Fields this console does not know (phone telemetry, newer fields), flattened one level. */
  function extraFields(p) {
    const out = [];
    const add = (name, value) => {
      if (value === null || value === undefined || value === "") return;
      if (typeof value === "object") return;
      const shown = typeof value === "number" && !Number.isInteger(value) ? value.toFixed(1) : String(value);
      out.push([name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()), shown]);
    };
    for (const [name, value] of Object.entries(p)) {
      if (KNOWN.has(name)) continue;
      if (value && typeof value === "object" && !Array.isArray(value)) {
        for (const [sub, v] of Object.entries(value)) add(`${name} ${sub}`, v);
      } else {
        add(name, value);
      }
    }
    return out;
  }

  function stateNote(p) {
    if (p.drained && (p.state === "ready" || p.state === "busy")) {
      return el("div", { class: "state-note warn", "data-role": "drained",
        text: `Drained (${p.drained}): no new requests until it recovers` });
    }
    if (p.state === "quarantined") {
      const note = el("div", { class: "state-note bad" }, "Quarantined after ",
        `${p.failures} failure${p.failures === 1 ? "" : "s"} in a row; retried in `,
        el("b", { "data-role": "countdown", "data-base": p.retry_in_s, text: duration(p.retry_in_s) }));
      return note;
    }
    if (p.state === "incompatible") return el("div", { class: "state-note bad", text: `Cannot serve: ${p.last_error || "unknown reason"}` });
    if (p.state === "offline") return el("div", { class: "state-note", text: `Gone: ${p.last_error || "not seen by adb"}` });
    if (p.state === "starting") return el("div", { class: "state-note", text: "Starting its runtime…" });
    if (p.state === "restarting") return el("div", { class: "state-note", text: "Restarting after a failure…" });
    return null;
  }

  function inFlight(p) {
    if (!p.request_in_flight) return null;
    const id = p.request_in_flight;
    const short = id.length > 22 ? `${id.slice(0, 18)}…` : id;
    return el("div", { class: "inflight", "data-role": "inflight" },
      "Serving ", el("span", { class: "mono", title: id, text: short }),
      p.live_tps ? ` · ${num(p.live_tps, 1)} tok/s` : " · starting…");
  }

  function sparkline(history) {
    const wrap = el("div", { class: "spark", "data-role": "spark" });
    if (history.length < 2) {
      wrap.append(history.length ? `decode ${num(history[0], 1)} tok/s (1 request)` : "no decode rate yet");
      return wrap;
    }
    const svgNS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("viewBox", "0 0 140 28");
    svg.setAttribute("role", "img");
    const lo = Math.min(...history);
    const hi = Math.max(...history);
    const top = hi * 1.1 || 1; // from 0: a slower phone shows as a drop, noise as noise
    const points = history.map((v, i) => {
      const x = (i / (history.length - 1)) * 138 + 1;
      const y = 27 - (v / top) * 25;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const line = document.createElementNS(svgNS, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
    const label = `decode rate of the last ${history.length} requests: ${num(lo, 1)}–${num(hi, 1)} tok/s`;
    svg.setAttribute("aria-label", label);
    wrap.append(svg, el("span", { text: `${num(lo, 1)}–${num(hi, 1)} tok/s, last ${history.length}` }));
    return wrap;
  }

  function lastError(p) {
    if (!p.last_error || p.state === "incompatible" || p.state === "offline") return null;
    const out = el("div", { class: "lasterr", "data-role": "last-error" }, `Last error: ${p.last_error}`);
    if (p.last_error_at) {
      out.append(" ", el("time", { "data-role": "error-time", "data-at": p.last_error_at,
        datetime: new Date(p.last_error_at * 1000).toISOString(),
        text: `(${clockTime(p.last_error_at)}, ${ago(p.last_error_at)})` }));
    }
    return out;
  }

  /** Clocks that run between snapshots: quarantine countdowns, queue waits, error ages. */
  function tickClocks() {
    const elapsed = sinceSnapshot();
    for (const node of document.querySelectorAll('[data-role="countdown"]')) {
      node.textContent = duration(Number(node.dataset.base) - elapsed);
    }
    for (const node of document.querySelectorAll('[data-role="oldest"][data-running="1"]')) {
      node.textContent = duration(Number(node.dataset.base) + elapsed);
    }
    for (const node of document.querySelectorAll('[data-role="error-time"]')) {
      const at = Number(node.dataset.at);
      node.textContent = `(${clockTime(at)}, ${ago(at)})`;
    }
  }

  const events = {
    controller: null,
    generation: 0,

    /** (Re)opens the stream, unless the tab is in the background: a browser opens at most six
     * connections to a server, and each open stream holds one (the seventh console tab would hang). */
    restart() {
      if (this.controller) this.controller.abort();
      this.controller = null;
      const generation = ++this.generation;
      if (document.hidden) setConnection("paused", "paused in the background");
      else this.run(generation);
    },

    async run(generation) {
      let backoff = 500;
      while (generation === this.generation) {
        const controller = (this.controller = new AbortController());
        try {
          setConnection("connecting", "connecting…");
          const response = await api("/v1/devices/events", {
            signal: controller.signal, headers: { Accept: "text/event-stream" },
          });
          if (!response.ok) throw new Error(await errorMessage(response));
          setConnection("live", "live");
          backoff = 500;
          await readEvents(response, (data) => onSnapshot(JSON.parse(data)));
        } catch (error) {
          if (error instanceof AuthError) return; // a new key restarts the stream
          if (controller.signal.aborted) return;
        }
        if (generation !== this.generation) return;
        setConnection("error", "server unreachable, retrying…");
        await sleep(backoff);
        backoff = Math.min(backoff * 2, RECONNECT_MAX_MS);
      }
    },
  };

  // ---------------------------------------------------------------- playground

  const playground = {
    conversation: [], // chat messages sent so far (user and assistant turns)
    controller: null,

    mode() {
      return document.querySelector('input[name="pg-mode"]:checked').value;
    },

    async loadModels() {
      const select = $("pg-model");
      try {
        const response = await api("/v1/models");
        if (!response.ok) throw new Error(await errorMessage(response));
        const models = (await response.json()).data || [];
        const chosen = select.value;
        select.replaceChildren(...models.map((m) => el("option", { value: m.id, text: m.id })));
        if (models.some((m) => m.id === chosen)) select.value = chosen;
        if (!models.length) select.append(el("option", { value: "", text: "no model served (no phone ready)" }));
        this.showError(models.length ? "" : "No model is served yet: no phone is ready. The farm view shows why.");
      } catch (error) {
        if (!(error instanceof AuthError)) this.showError(`Could not list models: ${error.message}`);
      }
    },

    showError(text) {
      $("pg-error").textContent = text;
      $("pg-error").hidden = !text;
    },

    setBusy(busy) {
      $("pg-send").disabled = busy;
      $("pg-stop").disabled = !busy;
    },

    newConversation() {
      this.stop();
      this.conversation = [];
      $("pg-log").replaceChildren();
      $("pg-empty").hidden = false;
    },

    stop() {
      if (this.controller) this.controller.abort();
    },

    settings() {
      const temperature = Number($("pg-temperature").value);
      const maxTokens = Math.round(Number($("pg-max-tokens").value));
      return {
        model: $("pg-model").value,
        temperature: isFinite(temperature) && temperature >= 0 ? temperature : 0.7,
        max_tokens: isFinite(maxTokens) && maxTokens >= 1 ? maxTokens : 256,
      };
    },

    async send() {
      const input = $("pg-input");
      const text = input.value;
      if (!text.trim() || this.controller) return;
      const raw = this.mode() === "raw";
      const base = this.settings();
      let path;
      let body;
      if (raw) {
        path = "/v1/completions";
        body = { ...base, prompt: text };
      } else {
        path = "/v1/chat/completions";
        const system = $("pg-system").value.trim();
        this.conversation.push({ role: "user", content: text });
        const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.conversation];
        body = { ...base, messages, chat_template_kwargs: { enable_thinking: $("pg-thinking").checked } };
      }
      Object.assign(body, { stream: true, stream_options: { include_usage: true }, return_timings: true });
      input.value = "";
      $("pg-empty").hidden = true;
      this.showError("");
      const turn = raw ? null : el("li", { class: "msg user" }, el("div", { class: "who", text: "you" }), el("div", { class: "text", text }));
      if (turn) $("pg-log").append(turn);
      const reply = new Reply(raw ? text : null);
      $("pg-log").append(reply.node);
      reply.node.scrollIntoView({ block: "end" });
      await this.run(path, body, reply, turn);
    },

    async run(path, body, reply, turn) {
      const raw = turn === null;
      const controller = (this.controller = new AbortController());
      this.setBusy(true);
      const started = performance.now();
      try {
        const response = await api(path, {
          method: "POST", signal: controller.signal,
          headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
          body: JSON.stringify(body),
        });
        if (!response.ok) throw new Error(await errorMessage(response));
        await readEvents(response, (data) => {
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
          reply.chunk(chunk, raw, started);
        });
        reply.done();
      } catch (error) {
        if (controller.signal.aborted) reply.stopped();
        else reply.failed(error instanceof AuthError ? "API key needed" : error.message);
      } finally {
        this.controller = null;
        this.setBusy(false);
        if (!raw) {
          if (reply.content) {
            this.conversation.push({ role: "assistant", content: reply.content });
          } else { // nothing came back: the turn is left out of what the next message sends, and says so
            this.conversation.pop();
            turn.dataset.unanswered = "1";
            turn.append(el("div", { class: "note", "data-role": "note", text: "No reply: left out of the conversation." }));
          }
        }
      }
    },

    setup() {
      $("pg-form").addEventListener("submit", (event) => {
        event.preventDefault();
        this.send();
      });
      $("pg-input").addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          this.send();
        }
      });
      $("view-playground").addEventListener("keydown", (event) => {
        if (event.key === "Escape" && this.controller) this.stop();
      });
      $("pg-stop").addEventListener("click", () => this.stop());
      $("pg-new").addEventListener("click", () => this.newConversation());
      for (const radio of document.querySelectorAll('input[name="pg-mode"]')) {
        radio.addEventListener("change", () => {
          const raw = this.mode() === "raw";
          for (const node of document.querySelectorAll(".chat-only")) node.hidden = raw;
          $("pg-input").placeholder = raw ? "A prompt to continue…" : "Message the model…";
        });
      }
      $("pg-model").addEventListener("focus", () => this.loadModels());
      // the settings fold away on a phone's screen (the conversation comes first), stay open on wider ones
      const narrow = window.matchMedia("(max-width: 760px)");
      const fold = () => { $("pg-settings-box").open = !narrow.matches; };
      narrow.addEventListener("change", fold);
      fold();
    },
  };

  /** One reply in the conversation: text as it streams, reasoning apart, the numbers at the end. */
  class Reply {
    constructor(prompt) {
      this.content = "";
      this.reasoning = null;
      this.firstTokenAt = null;
      this.usage = null;
      this.timings = null;
      this.finish = null;
      this.text = el("div", { class: "text", "data-role": "content" });
      this.node = el("li", { class: `msg assistant streaming${prompt !== null ? " raw" : ""}` },
        el("div", { class: "who", text: prompt !== null ? "completion" : "model" }));
      if (prompt !== null) this.text.append(el("span", { class: "prompt", text: prompt }));
      this.node.append(this.text);
    }

    chunk(chunk, raw, started) {
      if (chunk.usage) this.usage = chunk.usage;
      if (chunk.timings) this.timings = chunk.timings;
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      const piece = raw ? choice.text : choice.delta && choice.delta.content;
      const thought = !raw && choice.delta && choice.delta.reasoning_content;
      if ((piece || thought) && this.firstTokenAt === null) this.firstTokenAt = performance.now() - started;
      if (thought) this.addReasoning(thought);
      if (piece) {
        this.content += piece;
        this.text.append(document.createTextNode(piece));
      }
      if (choice.finish_reason) this.finish = choice.finish_reason;
    }

    addReasoning(text) {
      if (!this.reasoning) {
        this.reasoning = el("div", { class: "rtext", "data-role": "reasoning" });
        const box = el("details", { class: "reasoning", open: true }, el("summary", { text: "Reasoning" }), this.reasoning);
        this.node.insertBefore(box, this.text);
      }
      this.reasoning.append(document.createTextNode(text));
    }

    end() {
      this.node.classList.remove("streaming");
    }

    done() {
      this.end();
      const t = this.timings || {};
      const u = this.usage || {};
      const completion = u.completion_tokens;
      const ttft = typeof t.host_first_token_t_ms === "number" && typeof t.host_start_t_ms === "number"
        ? t.host_first_token_t_ms - t.host_start_t_ms : this.firstTokenAt;
      const tps = t.decode_ms > 0 && completion ? (completion / t.decode_ms) * 1000 : null;
      const cached = u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : null;
      const stat = (name, value, role) => el("span", { "data-role": role }, `${name} `, el("b", { text: value }));
      this.node.append(el("div", { class: "stats", "data-role": "stats" },
        stat("phone", t.phone || "–", "phone"),
        stat("TTFT", ms(ttft), "ttft"),
        stat("tok/s", num(tps, 1), "tps"),
        stat("prompt", num(u.prompt_tokens), "prompt-tokens"),
        stat("cached", num(cached), "cached-tokens"),
        stat("completion", num(completion), "completion-tokens"),
        stat("finish", this.finish || "–", "finish")));
    }

    stopped() {
      this.end();
      this.node.dataset.stopped = "1";
      this.node.append(el("div", { class: "note", "data-role": "note", text: "Stopped: cancelled on the phone." }));
    }

    failed(message) {
      this.end();
      this.node.append(el("div", { class: "note bad", "data-role": "note", text: `Error ${message}` }));
    }
  }

  // ---------------------------------------------------------------- requests

  const COLUMNS = ["Time", "Request", "Endpoint", "Model", "Phone", "Tokens", "TTFT", "Duration", "Status"];

  const requests = {
    timer: null,
    phones: [],
    loading: false, // a load is out
    seq: 0, // loads started

    visible() {
      return !$("view-requests").hidden;
    },

    phonesChanged(phones) {
      const serials = phones.map((p) => p.serial).sort();
      if (serials.join("\n") === this.phones.join("\n")) return;
      this.phones = serials;
      const select = $("rq-phone");
      const chosen = select.value;
      select.replaceChildren(el("option", { value: "", text: "all phones" }),
        ...serials.map((s) => el("option", { value: s, text: s })));
      if (chosen && !serials.includes(chosen)) select.append(el("option", { value: chosen, text: chosen }));
      select.value = chosen;
    },

    /** One poll at a time (a slow server must not collect them: each would hold one of the browser's
     * six connections to it); `fresh`: the filters changed, so this load goes out anyway and only
     * the newest load's answer is shown. */
    async load(fresh = false) {
      if (!this.visible() || (this.loading && !fresh)) return;
      const seq = ++this.seq;
      this.loading = true;
      const query = new URLSearchParams({ limit: String(REQUESTS_LIMIT) });
      if ($("rq-phone").value) query.set("phone", $("rq-phone").value);
      if ($("rq-status").value) query.set("status", $("rq-status").value);
      try {
        const response = await api(`/v1/requests?${query}`, { signal: AbortSignal.timeout(REQUESTS_TIMEOUT_MS) });
        if (!response.ok) throw new Error(await errorMessage(response));
        const body = await response.json();
        if (seq === this.seq) this.render(body.data || [], body.size);
      } catch (error) {
        if (seq === this.seq && !(error instanceof AuthError)) {
          $("rq-count").textContent = `Could not load requests: ${error.message}`;
        }
      } finally {
        if (seq === this.seq) this.loading = false;
      }
    },

    render(rows, size) {
      const filtered = $("rq-phone").value || $("rq-status").value;
      $("rq-empty").hidden = rows.length > 0;
      $("rq-empty").querySelector(".empty-title").textContent = filtered ? "No request matches" : "No requests yet";
      $("rq-table").parentElement.hidden = rows.length === 0;
      $("rq-count").textContent = rows.length ? `${rows.length} shown (the server keeps the last ${size})` : "";
      this.patchRows(rows);
    },

    /** The table's rows, one per request (its id and arrival: a client may reuse a request id), kept
     * in place from one poll to the next: a row still shown only has what changed in it changed, new
     * ones come in above, so that a selection in a row outlives the polls. */
    patchRows(rows) {
      const body = $("rq-body");
      const seen = new Map();
      const keyed = rows.map((r) => {
        const base = `${r.request_id} ${r.created}`;
        const n = (seen.get(base) || 0) + 1;
        seen.set(base, n);
        return [n > 1 ? `${base} ${n}` : base, r];
      });
      const wanted = new Set(keyed.map(([key]) => key));
      for (const tr of [...body.children]) if (!wanted.has(tr.dataset.key)) tr.remove();
      const have = new Map([...body.children].map((tr) => [tr.dataset.key, tr]));
      let at = body.firstElementChild;
      for (const [key, r] of keyed) {
        const next = this.row(r);
        next.dataset.key = key;
        const tr = have.get(key);
        if (!tr) {
          body.insertBefore(next, at);
          continue;
        }
        if (tr !== at) body.insertBefore(tr, at); // (rows keep their order: not expected)
        patchAttributes(tr, next);
        patchChildren(tr, [...next.childNodes]);
        at = tr.nextElementSibling;
      }
    },

    row(r) {
      const tokens = r.prompt_tokens === null || r.prompt_tokens === undefined ? "–"
        : `${r.prompt_tokens}${r.cached_tokens ? ` (${r.cached_tokens})` : ""} + ${r.completion_tokens ?? 0}`;
      const running = r.outcome === "running";
      const status = el("td", { "data-role": "status" },
        el("span", {}, el("span", { class: `st ${r.outcome}`, text: r.outcome }), r.status ? ` ${r.status}` : ""));
      if (r.error) status.append(el("div", { class: "err", text: r.error }));
      if (r.error) status.className = "err";
      const cells = [
        el("td", { text: clockTime(r.created) }),
        el("td", { class: "mono", title: r.request_id, text: r.id || r.request_id }),
        el("td", { text: r.endpoint }),
        el("td", { text: r.model || "–" }),
        el("td", { class: "mono", text: r.phone || "–" }),
        el("td", { class: "num", text: tokens }),
        el("td", { class: "num", text: ms(r.ttft_ms) }),
        el("td", { class: "num", text: running ? `${duration(Date.now() / 1000 - r.created)}…` : ms(r.duration_ms) }),
        status,
      ];
      // each cell names its column: on a phone's screen a row is shown as a small card
      cells.forEach((cell, i) => cell.setAttribute("data-label", COLUMNS[i]));
      return el("tr", { "data-outcome": r.outcome, "data-phone": r.phone || "" }, ...cells);
    },

    schedule() {
      clearInterval(this.timer);
      this.timer = null;
      if (this.visible() && !document.hidden && $("rq-live").checked) {
        this.timer = setInterval(() => this.load(), REQUESTS_POLL_MS);
      }
    },

    setup() {
      for (const id of ["rq-phone", "rq-status"]) $(id).addEventListener("change", () => this.load(true));
      $("rq-live").addEventListener("change", () => this.schedule());
      $("rq-filters").addEventListener("submit", (event) => event.preventDefault());
    },
  };

  // ---------------------------------------------------------------- tabs

  const VIEWS = ["farm", "playground", "requests"];

  function showView(name, focus = false) {
    if (!VIEWS.includes(name)) name = "farm";
    for (const view of VIEWS) {
      const tab = $(`tab-${view}`);
      const selected = view === name;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(`view-${view}`).hidden = !selected;
    }
    if (focus) $(`tab-${name}`).focus();
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
    if (name === "requests") requests.load();
    if (name === "playground") playground.loadModels();
    requests.schedule();
  }

  function setupTabs() {
    for (const view of VIEWS) $(`tab-${view}`).addEventListener("click", () => showView(view));
    document.querySelector('[role="tablist"]').addEventListener("keydown", (event) => {
      const current = VIEWS.findIndex((v) => $(`tab-${v}`).getAttribute("aria-selected") === "true");
      const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -current, End: VIEWS.length - 1 - current };
      if (!(event.key in moves)) return;
      event.preventDefault();
      showView(VIEWS[(current + moves[event.key] + VIEWS.length) % VIEWS.length], true);
    });
    window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
  }

  /** A tab in the background lets go of its connections (the event stream, the requests' polling) and
   * takes them up again, with the farm as it is then, when shown. A reply streaming meanwhile goes on. */
  function setupVisibility() {
    document.addEventListener("visibilitychange", () => {
      events.restart();
      requests.schedule();
      if (!document.hidden) requests.load();
    });
  }

  // ---------------------------------------------------------------- start

  function start() {
    setupKeyDialog();
    setupTabs();
    setupVisibility();
    playground.setup();
    requests.setup();
    showView(location.hash.slice(1) || "farm");
    events.restart();
    playground.loadModels();
    setInterval(tickClocks, 250);
  }

  start();
})();
