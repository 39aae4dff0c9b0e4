/* The admin UI: a small single-page app with hash routes, written by hand (no framework, no
 * build step, no CDN). Every text that comes from the API reaches the page through textContent
 * or attributes, never through innerHTML. Every API call goes to this page's own origin, with
 * the operator's token as a bearer token. */
"use strict";

(() => {
  const TOKEN_KEY = "smsAdmin.token";
  const SIGN_IN_KEY = "smsAdmin.signIn";
  const POLL_MS = 2000;
  const IMPORT_POLL_MS = 1000;
  const STATUS_ORDER = ["pending", "sent", "failed", "expired", "cancelled", "skipped"];
  const PLACEHOLDERS = ["{phone}", "{operator_code}", "{tag}", "{timezone}"];

  const state = {
    config: { auth_mode: "static", oidc: null },
    token: sessionStorage.getItem(TOKEN_KEY),
    timers: new Set(), // cleared whenever the route changes
    view: 0, // bumped on each route: late answers for an old view are dropped
    afterSignIn: null, // the route asked for before signing in
    role: null, // the signed-in token's role (GET /me); controls it may not use are not shown
  };

  // Roles that may create, edit, delete, import, pause, cancel and retry (chalicelib/roles.py).
  const WRITING_ROLES = ["operator", "admin"];

  function canWrite() {
    return WRITING_ROLES.includes(state.role);
  }

  /** The control when the signed-in role may use it, else nothing. */
  function writer(node) {
    return canWrite() ? node : null;
  }

  // ------------------------------------------------------------------ DOM helpers

  /** An element with attributes and children; strings become text nodes (never HTML). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "class") el.className = value;
      else if (key === "value") el.value = value;
      else if (key === "checked") el.checked = Boolean(value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function appendAll(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
  }

  /** Replaces an element's children (flattening lists, dropping null and false). */
  function fill(el, ...children) {
    el.replaceChildren();
    appendAll(el, children);
    return el;
  }

  /** A count as people read it: 5,167. */
  const number = (n) => Number(n).toLocaleString("en-US");

  // ------------------------------------------------------------------ SMS parts
  // A port of chalicelib/domain/sms_parts.py, for the live counter under a mailing's text; the
  // browser tests run the Python reference table (tests/support/sms_reference.py) through it.
  const GSM7_BASIC = new Set(Array.from(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?" +
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"));
  // Two septets each: an escape and the character.
  const GSM7_EXTENSION = new Set(Array.from("\f^{}\\[~]|€"));
  const SMS_LIMITS = { "GSM-7": { single: 160, perPart: 153 }, "UCS-2": { single: 70, perPart: 67 } };
  const TEMPLATE = /^(?:[^{}]|\{\{|\}\}|\{(?:phone|operator_code|tag|timezone)\})*$/u;

  /** A text's encoding, characters (code points), units (septets or 16-bit units) and parts;
   * an escape pair or an emoji's surrogate pair is never cut between parts. */
  function smsParts(text) {
    const chars = Array.from(text);
    const gsm = chars.every((c) => GSM7_BASIC.has(c) || GSM7_EXTENSION.has(c));
    const encoding = gsm ? "GSM-7" : "UCS-2";
    const widths = chars.map((c) => (gsm ? (GSM7_EXTENSION.has(c) ? 2 : 1) : (c.codePointAt(0) > 0xffff ? 2 : 1)));
    const units = widths.reduce((sum, w) => sum + w, 0);
    const { single, perPart } = SMS_LIMITS[encoding];
    let parts = 1;
    if (units > single) {
      let used = 0;
      for (const w of widths) {
        if (used + w > perPart) { parts += 1; used = 0; }
        used += w;
      }
    }
    return { encoding, characters: chars.length, units, parts };
  }
  window.SmsParts = Object.freeze({ count: smsParts });

  /** Show in `element` a text's characters, encoding and SMS parts, as the operator types it
   * ({tag} and {timezone} count as empty: each client's own). */
  function showParts(element, text) {
    const counted = smsParts(templateSkeleton(text));
    element.dataset.encoding = counted.encoding;
    element.dataset.parts = String(counted.parts);
    const placeholders = /\{(tag|timezone)\}/u.test(text) ? " (without {tag} and {timezone}: each client's own)" : "";
    element.textContent = ` · ${number(counted.characters)} characters · ${partsWords(counted.encoding, counted.parts, counted.parts)}${placeholders}`;
  }

  /** A mailing text as the counter counts it: the phone and operator code are always 11 and 3
   * digits; a tag and a timezone differ per client, so they count as empty here (the preview
   * counts each client's message). */
  function templateSkeleton(text) {
    return text.replace(/\{\{|\}\}|\{(phone|operator_code|tag|timezone)\}/gu, (match, name) => {
      if (match === "{{") return "{";
      if (match === "}}") return "}";
      return name === "phone" ? "70000000000" : name === "operator_code" ? "000" : "";
    });
  }

  /** "UCS-2, 2 parts" and the like. */
  function partsWords(encoding, low, high) {
    const range = low === high ? String(low) : `${low}–${high}`;
    return `${encoding}, ${range} ${high === 1 ? "part" : "parts"}`;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    appendAll(el, children);
    return el;
  }

  function mount(...nodes) {
    fill(document.getElementById("main"), nodes);
  }

  let fieldIds = 0;
  /** A labelled input with a hint and a slot for its API error. */
  function field(label, input, { name, hint, wide, check } = {}) {
    const id = input.id || `f${++fieldIds}`;
    input.id = id;
    const key = name || input.name;
    const error = h("p", { class: "field-error", id: `${id}-error` });
    const hintEl = hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null;
    input.setAttribute("aria-describedby", [hintEl && hintEl.id, error.id].filter(Boolean).join(" "));
    const labelEl = h("label", { for: id }, label);
    const classes = ["field", wide ? "wide" : "", check ? "check" : ""].filter(Boolean).join(" ");
    const parts = check ? [input, labelEl, hintEl, error] : [labelEl, input, hintEl, error];
    return h("div", { class: classes, dataset: { field: key } }, parts);
  }

  function formError() {
    return h("div", { class: "form-error", role: "alert", hidden: true });
  }

  function clearErrors(form) {
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    const box = form.querySelector(".form-error");
    if (box) {
      fill(box);
      box.hidden = true;
    }
  }

  /** Shows an API error next to the fields it names; the rest above the form. */
  function showErrors(form, err) {
    clearErrors(form);
    const loose = [];
    const marked = new Set();
    for (const detail of err.details || []) {
      const slot = fieldSlot(form, detail.field);
      if (slot) {
        marked.add(slot);
        const out = slot.querySelector(".field-error");
        out.textContent = out.textContent ? `${out.textContent}; ${detail.message}` : detail.message;
        const input = slot.querySelector("input, textarea, select");
        if (input) input.setAttribute("aria-invalid", "true");
      } else {
        loose.push(detail.field ? `${detail.field}: ${detail.message}` : detail.message);
      }
    }
    const box = form.querySelector(".form-error");
    if (box) {
      // The fields say what is wrong; for the service's validation errors the banner says how
      // many need attention (its summary says no more than that); any other error (a refused
      // token, a conflict) keeps its own words.
      const count = marked.size;
      const summary = count === 1 ? "1 field needs attention." : `${count} fields need attention.`;
      box.append(h("p", {}, count && err.code === "validation_error" ? summary : err.message));
      if (loose.length) box.append(h("ul", {}, loose.map((text) => h("li", {}, text))));
      box.hidden = false;
    }
    const first = form.querySelector("[aria-invalid='true']");
    if (first) first.focus();
  }

  /** The field an error's `field` path (`body.filter.tags.0`, `query.tag`) belongs to. */
  function fieldSlot(form, path) {
    if (!path) return null;
    const parts = path.split(".").filter((part) => part !== "body" && part !== "query");
    for (let n = parts.length; n > 0; n--) {
      const slot = form.querySelector(`[data-field="${CSS.escape(parts.slice(0, n).join("."))}"]`);
      if (slot) return slot;
    }
    const last = parts.filter((part) => !/^\d+$/.test(part)).pop();
    return last ? form.querySelector(`[data-field="${CSS.escape(last)}"]`) : null;
  }

  // ------------------------------------------------------------------ flash messages

  function flash(text, { error = false, sticky = error } = {}) {
    const area = document.getElementById("flash");
    const close = h("button", { type: "button", "aria-label": "Dismiss" }, "×");
    const note = h("div", { class: error ? "flash error" : "flash", dataset: { at: String(Date.now()) } }, h("span", {}, text), close);
    close.addEventListener("click", () => note.remove());
    area.append(note);
    while (area.children.length > 3) area.firstElementChild.remove();
    if (!sticky) setTimeout(() => note.remove(), 6000);
  }

  /** On a new page, old news goes: what was said just before navigating (saved, created) stays. */
  function ageFlash() {
    for (const note of document.querySelectorAll("#flash .flash:not(.error)")) {
      if (Date.now() - Number(note.dataset.at) > 1500) note.remove();
    }
  }

  function clearFlash() {
    fill(document.getElementById("flash"));
  }

  // ------------------------------------------------------------------ formatting

  /** A formatter whose output names the offset ("GMT+3"), or the zone's short name where the
   * browser lacks offsets; shown times are the browser's, so they must say which zone. */
  function zoned(options) {
    try {
      return new Intl.DateTimeFormat(undefined, { ...options, timeZoneName: "shortOffset" });
    } catch (err) {
      return new Intl.DateTimeFormat(undefined, { ...options, timeZoneName: "short" });
    }
  }

  const dateTime = zoned({ day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit" });
  const clockFormat = zoned({ hour: "2-digit", minute: "2-digit", second: "2-digit" });
  // The chart's axis labels: the zone is long for so little room, and the page says it elsewhere.
  const axisClock = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

  /** "6 Dec 2026, 16:29 UTC+3": the offset as UTC+n (Intl writes GMT+n). */
  function withZone(format, date) {
    return format
      .formatToParts(date)
      .map((part) => (part.type === "timeZoneName" ? part.value.replace(/^GMT/, "UTC").replace(/^UTC[+-]0$/, "UTC") : part.value))
      .join("");
  }

  const clock = { format: (date) => withZone(clockFormat, date) };

  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : withZone(dateTime, date);
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  /** An ISO timestamp as a datetime-local value in the browser's timezone. */
  function toLocalInput(iso) {
    const d = iso ? new Date(iso) : new Date();
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function fromLocalInput(value) {
    if (!value) return undefined;
    const date = new Date(value);
    return Number.isNaN(date.getTime()) ? value : date.toISOString();
  }

  function utcOffset() {
    const minutes = -new Date().getTimezoneOffset();
    const sign = minutes >= 0 ? "+" : "-";
    return `UTC${sign}${pad(Math.floor(Math.abs(minutes) / 60))}:${pad(Math.abs(minutes) % 60)}`;
  }

  function list(value) {
    return value
      .split(/[\s,]+/)
      .map((part) => part.trim())
      .filter(Boolean);
  }

  function cssToken(value) {
    return String(value).toLowerCase().replace(/[^a-z0-9-]/g, "");
  }

  function badge(status) {
    return h("span", { class: `badge badge-${cssToken(status)}`, "data-status": status }, status);
  }

  /** Messages that will never arrive: failed (the gateway refused them) or expired (too late). */
  function failures(stats) {
    return ((stats && stats.failed) || 0) + ((stats && stats.expired) || 0);
  }

  /** A mailing's status; one that ended with failures says so, in red, not a green "finished". */
  function mailingBadge(status, stats) {
    const lost = failures(stats);
    if (!lost || (status !== "finished" && status !== "cancelled")) return badge(status);
    const el = badge(status);
    el.classList.add("with-failures");
    el.textContent = `${status} with failures`;
    return el;
  }

  function statusKeys(stats) {
    const extra = Object.keys(stats).filter((k) => k !== "total" && !STATUS_ORDER.includes(k));
    return [...STATUS_ORDER.filter((k) => k in stats), ...extra.sort()];
  }

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.code = (body && body.error) || `http_${status}`;
      this.details = (body && Array.isArray(body.details) && body.details) || [];
    }
  }

  function apiUrl(path, query) {
    const url = new URL(path, document.baseURI);
    for (const [key, value] of Object.entries(query || {})) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
    }
    return url;
  }

  async function readBody(response) {
    const text = await response.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch {
      return { error: `http_${response.status}`, message: text.slice(0, 300) };
    }
  }

  /** Calls the API with the operator's token; a refused token signs the operator out. */
  async function api(method, path, { body, query, contentType, idempotencyKey } = {}) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
    let payload;
    if (body !== undefined) {
      headers["Content-Type"] = contentType || "application/json";
      payload = contentType ? body : JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(apiUrl(path, query), { method, headers, body: payload });
    } catch (exc) {
      throw new ApiError(0, { error: "network", message: `The service cannot be reached (${exc.message}).` });
    }
    const data = await readBody(response);
    if (response.status === 401 || (response.status === 403 && !(await tokenWorks()))) {
      signOut("Your token was refused. Sign in again.");
      throw new ApiError(response.status, data);
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  /** Whether an error says the route does not exist on this server (an older deployment):
   * locally a 405 or 404, behind API Gateway a 403 for a token that works elsewhere. */
  function unavailable(err) {
    return err.status === 405 || err.status === 403 || (err.status === 404 && err.code !== "not_found");
  }

  /** Whether the API accepts the token (API Gateway also answers 403 for unknown paths); GET
   * /me answers every role, and its role decides which controls are shown. */
  async function tokenWorks(token = state.token) {
    if (!token) return false;
    try {
      const response = await fetch(apiUrl("me"), {
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      });
      if (response.ok) state.role = ((await readBody(response)) || {}).role || "unknown";
      return response.ok;
    } catch {
      return true; // the network, not the token: do not sign out
    }
  }

  // ------------------------------------------------------------------ sign-in

  function setToken(token) {
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
  }

  function signOut(message) {
    state.token = null;
    state.role = null;
    sessionStorage.removeItem(TOKEN_KEY);
    stopTimers();
    if (message) flash(message, { error: true });
    if (location.hash !== "#/sign-in") location.hash = "#/sign-in";
    else route();
  }

  function base64url(bytes) {
    let text = "";
    for (const byte of bytes) text += String.fromCharCode(byte);
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function randomString(size = 32) {
    return base64url(crypto.getRandomValues(new Uint8Array(size)));
  }

  /** Idempotency-Keys for one create control: the same key while the same body is sent again
   * (a double submit, or a retry after a lost answer), so the server runs it once and replays
   * its answer; a fresh key once the body changes or after `done()` (a new request). */
  function idempotencyKeys() {
    let last = null;
    return {
      for(body) {
        const text = body instanceof Blob ? `${body.name}|${body.size}|${body.lastModified}` : JSON.stringify(body ?? null);
        if (!last || last.text !== text) {
          last = { text, key: crypto.randomUUID ? crypto.randomUUID() : randomString(24) };
        }
        return last.key;
      },
      done() {
        last = null;
      },
    };
  }

  function redirectUri() {
    return `${location.origin}${location.pathname}`;
  }

  /** Authorization code with PKCE (RFC 7636, S256): off to the provider's sign-in page. */
  async function startSingleSignOn() {
    const sso = state.config.oidc;
    const verifier = randomString(48);
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
    const pending = {
      verifier,
      state: randomString(24),
      nonce: randomString(24),
      returnTo: location.hash && location.hash !== "#/sign-in" ? location.hash : "#/mailings",
    };
    sessionStorage.setItem(SIGN_IN_KEY, JSON.stringify(pending));
    const url = new URL(sso.authorization_endpoint);
    const params = {
      response_type: "code",
      client_id: sso.client_id,
      redirect_uri: redirectUri(),
      scope: sso.scope,
      state: pending.state,
      nonce: pending.nonce,
      code_challenge: base64url(new Uint8Array(digest)),
      code_challenge_method: "S256",
    };
    for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
    location.assign(url.toString());
  }

  function jwtClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    } catch {
      return null;
    }
  }

  /** Back from the provider with `?code=&state=` (or `?error=&state=`): check the state first,
   * then exchange the code, check the ID token's nonce, and call the API with the access token. */
  async function finishSingleSignOn(params) {
    const pending = JSON.parse(sessionStorage.getItem(SIGN_IN_KEY) || "null");
    sessionStorage.removeItem(SIGN_IN_KEY);
    // The code must not stay in the address bar (or in history).
    history.replaceState(null, "", `${location.pathname}${(pending && pending.returnTo) || "#/mailings"}`);
    const sso = state.config.oidc;
    // Before anything the answer says, even an error: a forged callback must not be able to
    // put its own text on this page.
    if (!sso || !pending || params.get("state") !== pending.state) {
      flash("Sign-in failed: the answer does not belong to a sign-in started here. Try again.", {
        error: true,
      });
      return;
    }
    if (params.get("error")) {
      flash(`Sign-in failed: ${params.get("error_description") || params.get("error")}`, { error: true });
      return;
    }
    let data;
    try {
      const response = await fetch(sso.token_endpoint, {
        method: "POST",
        headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
        body: new URLSearchParams({
          grant_type: "authorization_code",
          code: params.get("code") || "",
          redirect_uri: redirectUri(),
          client_id: sso.client_id,
          code_verifier: pending.verifier,
        }),
      });
      data = await readBody(response);
      if (!response.ok) {
        const reason = (data && (data.error_description || data.error || data.message)) || response.status;
        throw new Error(String(reason));
      }
    } catch (exc) {
      flash(`Sign-in failed: the provider did not issue a token (${exc.message}).`, { error: true });
      return;
    }
    // The ID token proves this sign-in (its nonce is the one sent); without it, or without the
    // nonce, a token injected into the callback could not be told from ours.
    const claims = data && data.id_token ? jwtClaims(data.id_token) : null;
    if (!claims || claims.nonce !== pending.nonce) {
      flash("Sign-in failed: the ID token was not issued for this sign-in.", { error: true });
      return;
    }
    // The API is called with the access token, issued for the API's audience (OIDC_AUDIENCE);
    // the ID token is for this page only.
    const token = (data && data.access_token) || "";
    if (!token) {
      flash("Sign-in failed: the provider's answer holds no access token.", { error: true });
      return;
    }
    setToken(token);
    flash("Signed in.");
  }

  function signInView() {
    const sso = state.config.oidc;
    const input = h("input", {
      type: "password",
      name: "token",
      autocomplete: "off",
      spellcheck: "false",
      required: true,
    });
    const form = h(
      "form",
      { class: "grid", novalidate: true },
      formError(),
      field(state.config.auth_mode === "oidc" ? "Access token (JWT)" : "API token", input, {
        wide: true,
        hint:
          state.config.auth_mode === "oidc"
            ? "A token issued by the identity provider for this service."
            : "One of the service's API_TOKENS. `make run` prints one.",
      }),
      h("div", { class: "form-actions" }, h("button", { type: "submit" }, "Sign in")),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) {
        showErrors(form, new ApiError(0, { message: "Enter a token.", details: [{ field: "token", message: "required" }] }));
        return;
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      const accepted = await tokenWorks(token);
      button.disabled = false;
      if (!accepted) {
        showErrors(form, new ApiError(403, { message: "This token was refused.", details: [{ field: "token", message: "not accepted by the service" }] }));
        return;
      }
      setToken(token);
      clearFlash();
      const target = state.afterSignIn || "#/mailings";
      state.afterSignIn = null;
      if (location.hash === target) route();
      else location.hash = target;
    });
    const ssoPart = sso
      ? [
          h("button", { type: "button", id: "sso", onclick: () => startSingleSignOn() }, "Sign in with SSO"),
          h("p", { class: "muted" }, "or paste a token:"),
        ]
      : [];
    mount(h("section", { class: "panel narrow", "aria-labelledby": "sign-in-title" },
      h("h1", { id: "sign-in-title" }, "Sign in"),
      ssoPart,
      form,
    ));
    input.focus();
  }

  // ------------------------------------------------------------------ routing

  function stopTimers() {
    for (const stop of state.timers) stop();
    state.timers.clear();
  }

  /** Runs `task` now and then every `ms` after it completes, until the route changes. */
  function every(ms, task) {
    let timer = null;
    let stopped = false;
    const stop = () => {
      stopped = true;
      clearTimeout(timer);
    };
    state.timers.add(stop);
    const tick = async () => {
      try {
        await task();
      } catch (err) {
        console.error(err);
      } finally {
        if (!stopped) timer = setTimeout(tick, ms);
      }
    };
    tick();
    return stop;
  }

  function parseHash() {
    const raw = location.hash.replace(/^#/, "") || "/mailings";
    const [path, search = ""] = raw.split("?");
    return { path, query: new URLSearchParams(search) };
  }

  const ROUTES = [
    [/^\/clients$/, (m, q) => clientsView(q)],
    [/^\/clients\/new$/, () => clientFormView(null)],
    [/^\/clients\/([^/]+)$/, (m) => clientFormView(decodeURIComponent(m[1]))],
    [/^\/mailings$/, () => mailingsView()],
    [/^\/mailings\/new$/, () => mailingFormView(null)],
    [/^\/mailings\/([^/]+)\/edit$/, (m) => mailingFormView(decodeURIComponent(m[1]))],
    [/^\/mailings\/([^/]+)$/, (m) => statsView(decodeURIComponent(m[1]))],
  ];

  function route() {
    stopTimers();
    ageFlash();
    state.view += 1;
    const signedIn = Boolean(state.token);
    document.getElementById("nav").hidden = !signedIn;
    document.getElementById("sign-out").hidden = !signedIn;
    const { path, query } = parseHash();
    for (const link of document.querySelectorAll("#nav a")) {
      if (path.startsWith(`/${link.dataset.section}`)) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (!signedIn) {
      // After signing in, go where the operator was going (a bookmarked mailing, say).
      if (path !== "/sign-in") state.afterSignIn = location.hash;
      document.title = "Sign in · SMS campaigns admin";
      signInView();
      return;
    }
    if (path === "/sign-in") {
      location.hash = "#/mailings";
      return;
    }
    if (!state.role) {
      // A token kept from an earlier page load: learn its role before showing any control.
      const asked = state.view;
      tokenWorks().then((works) => {
        if (!works) signOut("Your token was refused. Sign in again.");
        else if (current(asked)) {
          state.role = state.role || "unknown"; // the network failed: show no writing control
          route();
        }
      });
      return;
    }
    const shown = state.view;
    for (const [pattern, view] of ROUTES) {
      const match = path.match(pattern);
      if (match) {
        // A view the operator has left must not cover the page now shown with its error.
        view(match, query).catch((err) => {
          if (current(shown)) showLoadError(err);
        });
        return;
      }
    }
    mount(h("section", { class: "panel" }, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/mailings" }, "Go to mailings"))));
  }

  function showLoadError(err) {
    // A refused token has signed the operator out already; a role refused a page is told so.
    if (err instanceof ApiError && (err.status === 401 || (err.status === 403 && !state.token))) return;
    mount(
      h("section", { class: "panel" },
        h("h1", {}, err.status === 404 ? "Not found" : "Something went wrong"),
        h("p", {}, err.message),
        h("p", {}, h("a", { href: "#/mailings" }, "Back to mailings"))),
    );
  }

  /** True while the view that asked is still the one on screen. */
  function current(view) {
    return view === state.view;
  }

  // ------------------------------------------------------------------ clients

  async function clientsView(query) {
    const view = state.view;
    document.title = "Clients · SMS campaigns admin";
    const filters = {
      phone: query.get("phone") || "",
      tag: query.get("tag") || "",
      operator_code: query.get("operator_code") || "",
    };
    const cursors = [null];

    const search = h(
      "form",
      { class: "grid", role: "search", "aria-label": "Search clients" },
      formError(),
      field("Phone", h("input", { name: "phone", inputmode: "numeric", placeholder: "79001234567", value: filters.phone }), { hint: "The whole number" }),
      field("Tag", h("input", { name: "tag", value: filters.tag })),
      field("Operator code", h("input", { name: "operator_code", inputmode: "numeric", placeholder: "900", value: filters.operator_code })),
      h("div", { class: "form-actions" },
        h("button", { type: "submit" }, "Search"),
        h("a", { class: "button secondary", href: "#/clients" }, "Clear")),
    );
    search.addEventListener("submit", (event) => {
      event.preventDefault();
      const params = new URLSearchParams();
      for (const name of ["phone", "tag", "operator_code"]) {
        const value = search.elements[name].value.trim();
        if (value) params.set(name, value);
      }
      const target = params.toString() ? `#/clients?${params}` : "#/clients";
      if (location.hash === target) route();
      else location.hash = target;
    });

    const results = h("div", { class: "table-wrap", id: "clients-table" });
    const pager = h("div", { class: "row pager" });
    const total = h("p", { class: "list-total", id: "clients-total", "aria-live": "polite" });
    const exactTotal = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => loadTotal(true) },
      "Count exactly");

    /** How many clients the search matches: the audience count the mailing form uses, asked
     * once per search. A large audience comes back estimated from a bounded read ("about");
     * `exact` asks the server to count every matching client. */
    async function loadTotal(exact = false) {
      let answer;
      if (filters.phone) {
        answer = null; // the list itself is the answer: one client or none
      } else {
        const filter = {
          operator_codes: filters.operator_code ? [filters.operator_code] : [],
          tags: filters.tag ? [filters.tag] : [],
        };
        try {
          answer = await api("POST", "mailings/preview", { body: { filter, sample_size: 0, exact } });
        } catch (err) {
          return; // the list shows the error, if any
        }
      }
      exactTotal.hidden = !(answer && answer.approximate);
      if (!current(view) || answer === null) return;
      const matched = answer.count;
      const noun = matched === 1 ? "client" : "clients";
      const filtered = filters.tag || filters.operator_code;
      const about = answer.approximate ? "about " : "";
      total.textContent = `${about}${number(matched)} ${noun} ${filtered ? (matched === 1 ? "matches" : "match") : "in total"}; listed in a fixed order.`;
    }

    // After a change (a delete, an import) the total may have moved too; paging keeps it.
    const refresh = async () => { await Promise.all([load(), loadTotal()]); };

    async function load() {
      let page;
      try {
        page = await api("GET", "clients", { query: { ...filters, cursor: cursors[cursors.length - 1] } });
      } catch (err) {
        if (!current(view)) return;
        if (err.status === 400) showErrors(search, err);
        else flash(`Clients could not be loaded: ${err.message}`, { error: true });
        fill(results, h("p", { class: "empty" }, "No clients to show."));
        return;
      }
      if (!current(view)) return;
      if (filters.phone) {
        total.textContent = page.items.length ? "1 client has this phone number." : "";
      }
      fill(results, clientsTable(page.items, refresh));
      fill(pager,
        cursors.length > 1
          ? h("button", { type: "button", class: "secondary", onclick: () => { cursors.pop(); load(); } }, "Previous page")
          : null,
        page.next_cursor
          ? h("button", { type: "button", class: "secondary", onclick: () => { cursors.push(page.next_cursor); load(); } }, "Next page")
          : null,
      );
    }

    mount(
      h("div", { class: "row spread" },
        h("h1", {}, "Clients"),
        writer(h("a", { class: "button", href: "#/clients/new" }, "New client"))),
      h("section", { class: "panel", "aria-label": "Search" }, search),
      h("section", { class: "panel", "aria-label": "Client list" }, total, exactTotal, results, pager),
      writer(importPanel(refresh)),
    );
    await Promise.all([load(), loadTotal()]);
  }

  function clientsTable(clients, reload) {
    if (!clients.length) return h("p", { class: "empty" }, "No clients match.");
    const rows = clients.map((client) => {
      const optedOut = Boolean(client.opted_out);
      const toggle = h(
        "button",
        {
          type: "button",
          class: "small secondary",
          "aria-label": `${optedOut ? "Opt back in" : "Opt out"} ${client.phone}`,
          onclick: async () => {
            toggle.disabled = true;
            try {
              await api("PATCH", `clients/${encodeURIComponent(client.id)}`, { body: { opted_out: !optedOut } });
              flash(`${client.phone} ${optedOut ? "opted back in" : "opted out"}.`);
              await reload();
            } catch (err) {
              toggle.disabled = false;
              flash(`Could not change ${client.phone}: ${err.message}`, { error: true });
            }
          },
        },
        optedOut ? "Opt in" : "Opt out",
      );
      return h("tr", { dataset: { clientId: client.id } },
        h("td", { "data-label": "Phone" }, client.phone),
        h("td", { "data-label": "Operator" }, client.operator_code),
        h("td", { "data-label": "Tag" }, client.tag || "—"),
        h("td", { "data-label": "Timezone" }, client.timezone),
        h("td", { "data-label": "Opted out" }, optedOut ? "yes" : "no"),
        h("td", { "data-label": "Actions" },
          h("div", { class: "actions" },
            writer(h("a", { class: "button small secondary", href: `#/clients/${encodeURIComponent(client.id)}`, "aria-label": `Edit ${client.phone}` }, "Edit")),
            writer(toggle),
            writer(deleteButton(`clients/${encodeURIComponent(client.id)}`, client.phone, reload)))),
      );
    });
    return h("table", { class: "cards" },
      h("thead", {}, h("tr", {}, ["Phone", "Operator", "Tag", "Timezone", "Opted out", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows));
  }

  /** A delete button that asks once more inline (no browser dialog) before deleting. */
  function deleteButton(path, what, after) {
    let armed = null;
    const button = h("button", { type: "button", class: "small danger", "aria-label": `Delete ${what}` }, "Delete");
    button.addEventListener("click", async () => {
      if (!armed) {
        button.textContent = "Confirm delete";
        button.classList.add("confirming");
        armed = setTimeout(() => {
          armed = null;
          button.textContent = "Delete";
          button.classList.remove("confirming");
        }, 5000);
        return;
      }
      clearTimeout(armed);
      button.disabled = true;
      try {
        await api("DELETE", path);
        flash(`Deleted ${what}.`);
        await after();
      } catch (err) {
        button.disabled = false;
        flash(`Could not delete ${what}: ${err.message}`, { error: true });
      }
    });
    return button;
  }

  function importPanel(reload) {
    const file = h("input", { type: "file", name: "file", accept: ".csv,text/csv", required: true });
    const report = h("div", { id: "import-report", "aria-live": "polite" });
    const form = h("form", { class: "grid" },
      formError(),
      field("CSV file", file, {
        wide: true,
        hint: "UTF-8, first line naming the columns: phone, and any of operator_code, tag, timezone. A known phone is updated.",
      }),
      h("div", { class: "form-actions" }, h("button", { type: "submit" }, "Import")),
    );
    const view = state.view;
    const keys = idempotencyKeys();
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors(form);
      const chosen = file.files && file.files[0];
      if (!chosen) {
        showErrors(form, new ApiError(0, { message: "Choose a CSV file.", details: [{ field: "file", message: "required" }] }));
        return;
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        let job = await api("POST", "clients/import", { body: chosen, contentType: "text/csv", idempotencyKey: keys.for(chosen) });
        keys.done();
        fill(report, importReport(job));
        while (job.status !== "done" && job.status !== "failed") {
          await new Promise((resolve) => setTimeout(resolve, IMPORT_POLL_MS));
          if (!current(view)) return;
          job = await api("GET", `clients/imports/${encodeURIComponent(job.id)}`);
          fill(report, importReport(job));
        }
        flash(job.status === "done" ? `Import finished: ${job.created} created, ${job.updated} updated.` : "Import failed.", { error: job.status === "failed" });
        await reload();
      } catch (err) {
        if (unavailable(err)) {
          showErrors(form, new ApiError(404, { message: "CSV import is not available on this server." }));
        } else {
          showErrors(form, err);
        }
      } finally {
        button.disabled = false;
      }
    });
    return h("section", { class: "panel", "aria-labelledby": "import-title" },
      h("h2", { id: "import-title" }, "Import clients from CSV"), form, report);
  }

  function importReport(job) {
    const numbers = ["rows", "valid", "invalid", "created", "updated", "unchanged", "failed"];
    const errors = job.errors || [];
    return h("div", {},
      h("p", {}, "Import ", badge(job.status)),
      h("dl", { class: "counts" },
        numbers.map((key) => h("div", { class: "count" }, h("dt", {}, key), h("dd", { "data-count": key }, String(job[key] ?? 0))))),
      errors.length
        ? h("div", { class: "table-wrap" },
          h("h3", {}, `Rows with errors (${errors.length})`),
          h("table", { class: "cards", id: "import-errors" },
            h("thead", {}, h("tr", {}, ["Row", "Field", "Error"].map((t) => h("th", { scope: "col" }, t)))),
            h("tbody", {}, errors.map((e) => h("tr", {},
              h("td", { "data-label": "Row", class: "num" }, String(e.row)),
              h("td", { "data-label": "Field" }, e.field || "—"),
              h("td", { "data-label": "Error" }, e.message))))))
        : null,
      job.errors_omitted ? h("p", { class: "hint" }, `${job.errors_omitted} more rows with errors are not listed.`) : null);
  }

  const COMMON_ZONES = ["UTC", "Europe/Moscow", "Europe/Kaliningrad", "Europe/Samara", "Asia/Yekaterinburg", "Asia/Novosibirsk", "Asia/Vladivostok", "Europe/London", "Europe/Berlin", "America/New_York"];

  async function clientFormView(clientId) {
    const view = state.view;
    const editing = clientId !== null;
    document.title = `${editing ? "Edit client" : "New client"} · SMS campaigns admin`;
    const client = editing ? await api("GET", `clients/${encodeURIComponent(clientId)}`) : null;
    if (!current(view)) return;
    const zones = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : COMMON_ZONES;
    const inputs = {
      phone: h("input", { name: "phone", required: true, inputmode: "numeric", autocomplete: "off", placeholder: "79001234567", value: client ? client.phone : "" }),
      operator_code: h("input", { name: "operator_code", inputmode: "numeric", placeholder: "from the phone", value: client ? client.operator_code : "" }),
      tag: h("input", { name: "tag", value: client ? client.tag : "" }),
      timezone: h("input", { name: "timezone", list: "timezones", value: client ? client.timezone : "UTC" }),
      opted_out: h("input", { type: "checkbox", name: "opted_out", checked: client ? client.opted_out : false }),
    };
    const keys = idempotencyKeys();
    const form = h("form", { class: "grid", "aria-labelledby": "client-title" },
      formError(),
      field("Phone", inputs.phone, { hint: "11 digits starting with 7" }),
      field("Operator code", inputs.operator_code, { hint: "3 digits; empty: digits 2–4 of the phone" }),
      field("Tag", inputs.tag),
      field("Timezone", inputs.timezone, { hint: "IANA name, e.g. Europe/Moscow" }),
      h("datalist", { id: "timezones" }, ["UTC", ...zones].map((zone) => h("option", { value: zone }))),
      field("Opted out (never sent to)", inputs.opted_out, { check: true, wide: true }),
      h("div", { class: "form-actions" },
        h("button", { type: "submit" }, editing ? "Save client" : "Create client"),
        h("a", { class: "button secondary", href: "#/clients" }, "Cancel"),
        editing && canWrite() ? deleteButton(`clients/${encodeURIComponent(clientId)}`, client.phone, async () => { location.hash = "#/clients"; }) : null),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors(form);
      const body = {
        phone: inputs.phone.value.trim(),
        tag: inputs.tag.value.trim(),
        timezone: inputs.timezone.value.trim() || "UTC",
        opted_out: inputs.opted_out.checked,
      };
      const code = inputs.operator_code.value.trim();
      if (code) body.operator_code = code;
      if (editing && !client.opted_out && !body.opted_out) delete body.opted_out;
      if (!editing && !body.opted_out) delete body.opted_out;
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const saved = editing
          ? await api("PATCH", `clients/${encodeURIComponent(clientId)}`, { body })
          : await api("POST", "clients", { body, idempotencyKey: keys.for(body) });
        flash(`${editing ? "Saved" : "Created"} client ${saved.phone}.`);
        location.hash = "#/clients";
      } catch (err) {
        showErrors(form, err);
      } finally {
        button.disabled = false;
      }
    });
    mount(
      h("p", {}, h("a", { href: "#/clients" }, "← Clients")),
      h("section", { class: "panel" }, h("h1", { id: "client-title" }, editing ? `Client ${client.phone}` : "New client"), form),
      editing ? repliesPanel(view, clientId) : null,
    );
    inputs.phone.focus();
  }

  /** The SMS replies a client sent (POST /inbound-sms keeps those that are not STOP keywords),
   * newest first, a page at a time. */
  function repliesPanel(view, clientId) {
    const list = h("div", { id: "client-replies" });
    const more = h("button", { type: "button", class: "small secondary", id: "more-replies", hidden: true }, "Older replies");
    const rows = h("tbody", {});
    let cursor = null;
    async function load() {
      more.disabled = true;
      let page;
      try {
        page = await api("GET", `clients/${encodeURIComponent(clientId)}/replies`, { query: { limit: 20, cursor } });
      } catch (err) {
        if (current(view)) fill(list, h("p", { class: "muted" }, unavailable(err) ? "Replies are not available on this server." : `The replies cannot be read: ${err.message}`));
        return;
      }
      if (!current(view)) return;
      if (!cursor && !page.items.length) {
        fill(list, h("p", { class: "muted" }, "No replies."));
        return;
      }
      if (!cursor) {
        fill(list, h("table", { class: "cards", id: "replies-table" },
          h("thead", {}, h("tr", {}, ["When", "Text"].map((t) => h("th", { scope: "col" }, t)))), rows));
      }
      appendAll(rows, page.items.map((r) => h("tr", {},
        h("td", { "data-label": "When" }, when(r.received_at)),
        h("td", { "data-label": "Text", class: "text" }, r.text))));
      cursor = page.next_cursor;
      more.hidden = !cursor;
      more.disabled = false;
    }
    more.addEventListener("click", load);
    load();
    return h("section", { class: "panel", "aria-labelledby": "replies-title" },
      h("h2", { id: "replies-title" }, "Replies"),
      h("p", { class: "hint" }, "SMS the client sent back, newest first; a reply that is only STOP (or СТОП…) opts it out instead."),
      list, more);
  }

  // ------------------------------------------------------------------ mailings

  async function mailingsView() {
    const view = state.view;
    document.title = "Mailings · SMS campaigns admin";
    const cursors = [null];
    const results = h("div", { class: "table-wrap", id: "mailings-table" });
    const pager = h("div", { class: "row pager" });

    async function load() {
      const page = await api("GET", "mailings", { query: { cursor: cursors[cursors.length - 1] } });
      if (!current(view)) return;
      fill(results, mailingsTable(page.items, load));
      fill(pager,
        cursors.length > 1 ? h("button", { type: "button", class: "secondary", onclick: () => { cursors.pop(); load().catch(showLoadError); } }, "Previous page") : null,
        page.next_cursor ? h("button", { type: "button", class: "secondary", onclick: () => { cursors.push(page.next_cursor); load().catch(showLoadError); } }, "Next page") : null,
      );
    }

    mount(
      h("div", { class: "row spread" }, h("h1", {}, "Mailings"), writer(h("a", { class: "button", href: "#/mailings/new" }, "New mailing"))),
      gatewayPanel(view, { onlyWhenDegraded: true }),
      h("section", { class: "panel", "aria-label": "Mailing list" }, results, pager),
    );
    await load();
  }

  function mailingsTable(mailings, reload) {
    if (!mailings.length) return h("p", { class: "empty" }, "No mailings yet.");
    const rows = mailings.map((mailing) => {
      const stats = mailing.stats || {};
      const done = (stats.total || 0) - (stats.pending || 0);
      const href = `#/mailings/${encodeURIComponent(mailing.id)}`;
      const lostCell = (label, key) =>
        h("td", { "data-label": label, "data-count": key, class: stats[key] ? "num failures" : "num" }, String(stats[key] || 0));
      return h("tr", { dataset: { mailingId: mailing.id }, class: failures(stats) ? "has-failures" : null },
        h("td", { "data-label": "Text", class: "text" }, h("a", { href }, mailing.text.length > 80 ? `${mailing.text.slice(0, 80)}…` : mailing.text)),
        h("td", { "data-label": "Status" }, mailingBadge(mailing.status, stats)),
        h("td", { "data-label": "Start" }, when(mailing.start_at)),
        h("td", { "data-label": "End" }, when(mailing.end_at)),
        h("td", { "data-label": "Done", class: "num" }, `${done} / ${stats.total || 0}`),
        lostCell("Failed", "failed"),
        lostCell("Expired", "expired"),
        h("td", { "data-label": "Actions" },
          h("div", { class: "actions" },
            h("a", { class: "button small secondary", href }, "Statistics"),
            mailingActions(mailing, reload, { small: true }))),
      );
    });
    return h("table", { class: "cards" },
      h("thead", {}, h("tr", {}, ["Text", "Status", "Start", "End", "Done", "Failed", "Expired", "Actions"].map((t) => h("th", { scope: "col", class: ["Done", "Failed", "Expired"].includes(t) ? "num" : null }, t)))),
      h("tbody", {}, rows));
  }

  // The audit trail's actions on a mailing, in words (GET /audit?target=<mailing id>).
  const HISTORY_ACTIONS = {
    create_mailing: "Created",
    replace_mailing: "Edited (replaced)",
    patch_mailing: "Edited",
    pause_mailing: "Paused",
    resume_mailing: "Resumed",
    cancel_mailing: "Cancelled",
    retry_failed: "Retried failed messages",
    delete_mailing: "Deleted",
  };

  /** Edit, pause, resume and cancel, as the mailing's status allows. */
  function mailingActions(mailing, after, { small = false } = {}) {
    const id = encodeURIComponent(mailing.id);
    const size = small ? "small " : "";
    const act = (label, path, done) => {
      const button = h("button", { type: "button", class: `${size}secondary` }, label);
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          const updated = await api("POST", `mailings/${id}/${path}`);
          flash(`Mailing ${done} (now ${updated.status}).`);
          await after(updated);
        } catch (err) {
          const reason = unavailable(err) ? "this server does not support it" : err.message;
          flash(`Could not ${label.toLowerCase()} the mailing: ${reason}`, { error: true });
          button.disabled = false;
        }
      });
      return button;
    };
    if (!canWrite()) return [];
    const status = mailing.status;
    const open = status === "scheduled" || status === "running" || status === "paused";
    return [
      open ? h("a", { class: `button ${size}secondary`, href: `#/mailings/${id}/edit` }, "Edit") : null,
      status === "scheduled" || status === "running" ? act("Pause", "pause", "paused") : null,
      status === "paused" ? act("Resume", "resume", "resumed") : null,
      open ? act("Cancel", "cancel", "cancelled") : null,
    ].filter(Boolean);
  }

  async function mailingFormView(mailingId) {
    const view = state.view;
    const editing = mailingId !== null;
    document.title = `${editing ? "Edit mailing" : "New mailing"} · SMS campaigns admin`;
    const mailing = editing ? await api("GET", `mailings/${encodeURIComponent(mailingId)}`) : null;
    if (!current(view)) return;
    const now = new Date();
    const inputs = {
      text: h("textarea", { name: "text", required: true, maxlength: 1000, rows: 4 }),
      start_at: h("input", { type: "datetime-local", name: "start_at", required: true, value: toLocalInput(mailing ? mailing.start_at : now.toISOString()) }),
      end_at: h("input", { type: "datetime-local", name: "end_at", required: true, value: toLocalInput(mailing ? mailing.end_at : new Date(now.getTime() + 86400000).toISOString()) }),
      operator_codes: h("input", { name: "operator_codes", inputmode: "numeric", placeholder: "any (e.g. 900, 901)", value: mailing ? mailing.filter.operator_codes.join(", ") : "" }),
      tags: h("input", { name: "tags", placeholder: "any (e.g. vip, new)", value: mailing ? mailing.filter.tags.join(", ") : "" }),
      max_parts: h("input", { type: "number", name: "max_parts", min: 1, max: 10, step: 1, inputmode: "numeric", placeholder: "default", value: mailing && mailing.max_parts ? String(mailing.max_parts) : "" }),
      windowOn: h("input", { type: "checkbox", name: "window_on", checked: Boolean(mailing && mailing.send_window) }),
      windowStart: h("input", { type: "time", name: "window_start", value: mailing && mailing.send_window ? mailing.send_window.start : "09:00" }),
      windowEnd: h("input", { type: "time", name: "window_end", value: mailing && mailing.send_window ? mailing.send_window.end : "21:00" }),
    };
    inputs.text.value = mailing ? mailing.text : "";
    const counter = h("span", { class: "hint", "aria-live": "off" });
    const countText = () => { counter.textContent = `${inputs.text.value.length} / 1000`; };
    inputs.text.addEventListener("input", countText);
    countText();
    // Characters, encoding and SMS parts, live as the operator types.
    const partsCounter = h("span", { class: "hint", id: "text-parts", "aria-live": "off" });
    const countParts = () => showParts(partsCounter, inputs.text.value);
    inputs.text.addEventListener("input", countParts);
    countParts();

    const windowTimes = h("div", { class: "window-times" },
      h("label", { for: "window-start" }, "from"), inputs.windowStart,
      h("label", { for: "window-end" }, "to"), inputs.windowEnd);
    inputs.windowStart.id = "window-start";
    inputs.windowEnd.id = "window-end";
    const syncWindow = () => {
      inputs.windowStart.disabled = !inputs.windowOn.checked;
      inputs.windowEnd.disabled = !inputs.windowOn.checked;
    };
    inputs.windowOn.addEventListener("change", syncWindow);
    syncWindow();
    const windowError = h("p", { class: "field-error" });
    const windowSet = h("fieldset", { class: "wide", dataset: { field: "send_window" } },
      h("legend", {}, "Send window (client's local time)"),
      h("div", { class: "row" }, inputs.windowOn, h("label", { for: "window-on" }, "Only send between"), windowTimes),
      h("p", { class: "hint" }, "An end earlier than the start wraps past midnight (22:00–06:00)."),
      windowError);
    inputs.windowOn.id = "window-on";

    const preview = h("div", { class: "preview wide", id: "audience-preview", "aria-live": "polite" },
      h("p", { class: "muted" }, "The audience is previewed here."));
    const previewButton = h("button", { type: "button", class: "secondary" }, "Preview audience");

    const filter = () => ({ operator_codes: list(inputs.operator_codes.value), tags: list(inputs.tags.value) });
    let previewSeq = 0;
    let exactFilter = null; // the filter the operator asked to count exactly
    /** Count the audience of the filter; a large one comes back estimated from a bounded read
     * and says "about", with a button that asks for the exact count (which reads it all). */
    async function runPreview(exact = false) {
      // Once the operator asked for the exact count, later previews of the same filter (a text
      // edit's, or a debounced one still on its way) count exactly too, not "about" again.
      const key = JSON.stringify(filter());
      if (exact === true) exactFilter = key; // a click passes its event
      exact = exactFilter === key;
      const seq = ++previewSeq;
      fill(preview, h("p", { class: "muted" }, exact ? "Counting every client of the audience…" : "Counting the audience…"));
      try {
        const text = inputs.text.value;
        // A text whose placeholders are not complete yet would be refused: previewed without it.
        const withText = text && TEMPLATE.test(text) ? { text } : {};
        const answer = await api("POST", "mailings/preview", { body: { filter: filter(), sample_size: 5, exact, ...withText } });
        if (seq !== previewSeq || !current(view)) return;
        const count = answer.count;
        const clients = `${number(count)} ${count === 1 ? "client matches" : "clients match"} this filter`;
        fill(preview,
          h("p", { class: "count-line", id: "audience-count", "data-count": String(count), "data-approximate": String(answer.approximate) },
            answer.approximate ? `About ${clients}` : clients),
          answer.approximate
            ? h("p", { class: "hint" },
              `Estimated from part of the audience: between ${number(answer.count_low)} and ${number(answer.count_high)} (95 % sure). `,
              h("button", { type: "button", class: "secondary", onclick: () => runPreview(true) }, "Count exactly"))
            : null,
          previewParts(answer),
          answer.sample && answer.sample.length
            ? h("div", {}, h("p", { class: "hint" }, "For example:"),
              h("ul", {}, answer.sample.map((c) => h("li", {}, `${c.phone} · operator ${c.operator_code}${c.tag ? ` · ${c.tag}` : ""}`))))
            : null,
        );
      } catch (err) {
        if (seq !== previewSeq || !current(view)) return;
        const text = unavailable(err)
          ? "Audience preview is not available on this server."
          : `Preview failed: ${err.message}`;
        const problems = err.details.map((d) => h("li", {}, `${d.field || ""} ${d.message}`.trim()));
        fill(preview, h("p", { class: "field-error" }, text), problems.length ? h("ul", {}, problems) : null);
      }
    }
    previewButton.addEventListener("click", runPreview);
    let debounce = null;
    for (const input of [inputs.operator_codes, inputs.tags, inputs.text]) {
      input.addEventListener("input", () => {
        clearTimeout(debounce);
        debounce = setTimeout(runPreview, 400);
      });
    }

    const campaign = campaignFields(mailing, inputs.text);
    const keys = idempotencyKeys();
    const form = h("form", { class: "grid", "aria-labelledby": "mailing-title" },
      formError(),
      field("Text", inputs.text, {
        wide: true,
        hint: `Up to 1000 characters. Placeholders: ${PLACEHOLDERS.join(", ")} (write {{ and }} for literal braces).`,
      }),
      h("div", { class: "wide" }, counter, partsCounter),
      field("Start", inputs.start_at, { hint: `Your local time (${utcOffset()}); now or earlier starts at once` }),
      field("End", inputs.end_at, { hint: "Unsent messages expire after it" }),
      field("Operator codes", inputs.operator_codes, { hint: "Comma-separated; empty: any operator" }),
      field("Tags", inputs.tags, { hint: "Comma-separated; empty: any tag" }),
      field("Max SMS parts", inputs.max_parts, { hint: "1–10 parts a message; empty: the server's default (4 unless configured)" }),
      windowSet,
      campaign.element,
      h("div", { class: "form-actions wide" }, previewButton),
      preview,
      h("div", { class: "form-actions" },
        h("button", { type: "submit" }, editing ? "Save mailing" : "Create mailing"),
        h("a", { class: "button secondary", href: editing ? `#/mailings/${encodeURIComponent(mailingId)}` : "#/mailings" }, "Cancel")),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors(form);
      windowError.textContent = "";
      const body = {
        text: inputs.text.value,
        start_at: fromLocalInput(inputs.start_at.value),
        end_at: fromLocalInput(inputs.end_at.value),
        filter: filter(),
        send_window: inputs.windowOn.checked ? { start: inputs.windowStart.value, end: inputs.windowEnd.value } : null,
      };
      // Empty: the default on a new mailing, unchanged on an edit.
      if (inputs.max_parts.value.trim()) body.max_parts = Number(inputs.max_parts.value);
      for (const key of ["start_at", "end_at"]) if (body[key] === undefined) delete body[key];
      if (!editing && body.send_window === null) delete body.send_window;
      campaign.apply(body);
      if (editing) {
        // Only what changed: a running mailing refuses some changes (its start, its filter).
        for (const key of Object.keys(body)) {
          if (JSON.stringify(normalise(key, body[key])) === JSON.stringify(normalise(key, mailing[key]))) delete body[key];
        }
        if (!Object.keys(body).length) {
          location.hash = `#/mailings/${encodeURIComponent(mailingId)}`;
          return;
        }
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const saved = editing
          ? await api("PATCH", `mailings/${encodeURIComponent(mailingId)}`, { body })
          : await api("POST", "mailings", { body, idempotencyKey: keys.for(body) });
        flash(editing ? "Mailing saved." : "Mailing created.");
        location.hash = `#/mailings/${encodeURIComponent(saved.id)}`;
      } catch (err) {
        showErrors(form, err);
      } finally {
        button.disabled = false;
      }
    });
    mount(
      h("p", {}, h("a", { href: "#/mailings" }, "← Mailings")),
      h("section", { class: "panel" }, h("h1", { id: "mailing-title" }, editing ? "Edit mailing" : "New mailing"), form),
    );
    campaign.sync();
    inputs.text.focus();
    runPreview();
  }

  /** A mailing's parts and cost as estimated when its text or filter was set. */
  function mailingParts(mailing) {
    const parts = mailing.parts;
    const about = parts.approximate ? "about " : "";
    const cost = mailing.cost_estimate;
    return `${partsWords(parts.encoding, parts.per_message_min, parts.per_message_max)} a message (at most ${mailing.max_parts}); ${about}${number(parts.total)} in all` +
      (cost ? `, ${about}${cost.amount.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })} ${cost.currency}` : "");
  }

  /** The preview's parts and cost of the text over the audience, if it was given a text. */
  function previewParts(answer) {
    const parts = answer.parts;
    if (!parts) return null;
    const about = parts.approximate ? "about " : "";
    const cost = answer.cost_estimate;
    return h("p", { id: "audience-parts", dataset: { encoding: parts.encoding, total: String(parts.total) } },
      `Messages: ${partsWords(parts.encoding, parts.per_message_min, parts.per_message_max)} each; ${about}${number(parts.total)} ${parts.total === 1 ? "part" : "parts"} in all`,
      cost ? `, costing ${about}${cost.amount.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })} ${cost.currency}` : "",
      ".");
  }

  function normalise(key, value) {
    if (value && (key === "start_at" || key === "end_at")) return new Date(value).getTime();
    if (key === "filter" && value) return { operator_codes: [...value.operator_codes].sort(), tags: [...value.tags].sort() };
    if (key === "variants" && value) return value.map((v) => ({ text: v.text, weight: v.weight }));
    return value ?? null;
  }

  // ------------------------------------------------------------------ A/B variants, holdout, frequency cap

  const VARIANT_NAMES = ["A", "B", "C", "D", "E"];

  /** The mailing form's campaign part: A/B variant texts with their weights (2-5), the holdout
   * share and the frequency-cap exemption. `apply(body)` puts them in a request body (with
   * variants, the text is variant A's and `text` is left out); `sync()` shows the text box or
   * the variants once the form is built. */
  function campaignFields(mailing, textInput) {
    const hadVariants = Boolean(mailing && mailing.variants);
    const abOn = h("input", { type: "checkbox", id: "ab-on", name: "ab_on", checked: hadVariants, disabled: hadVariants });
    let variants = hadVariants
      ? mailing.variants.map((v) => ({ text: v.text, weight: v.weight }))
      : [{ text: "", weight: 1 }, { text: "", weight: 1 }];
    const rows = h("div", { class: "variant-rows", id: "variant-rows" });
    const add = h("button", { type: "button", class: "secondary", id: "add-variant" }, "Add variant");
    const holdout = h("input", { type: "number", name: "holdout_percent", id: "holdout-percent", min: 0, max: 50, step: 1, value: String(mailing ? mailing.holdout_percent || 0 : 0) });
    const exempt = h("input", { type: "checkbox", name: "frequency_cap_exempt", id: "cap-exempt", checked: Boolean(mailing && mailing.frequency_cap_exempt) });

    function render() {
      fill(rows, variants.map((v, index) => {
        const name = VARIANT_NAMES[index];
        const text = h("textarea", { name: "variant_text", rows: 3, maxlength: 1000, "aria-label": `Variant ${name} text`, dataset: { variant: name } });
        text.value = v.text;
        // The same live count of characters, encoding and parts as the single text box.
        const parts = h("span", { class: "hint variant-parts", "aria-live": "off", dataset: { variant: name } });
        text.addEventListener("input", () => { v.text = text.value; showParts(parts, v.text); });
        showParts(parts, v.text);
        const weight = h("input", { type: "number", name: "variant_weight", min: 1, max: 100, step: 1, value: String(v.weight), "aria-label": `Variant ${name} weight` });
        weight.addEventListener("input", () => { v.weight = Number(weight.value); });
        const remove = h("button", { type: "button", class: "secondary", disabled: variants.length <= 2 || hadVariants, onclick: () => { variants.splice(index, 1); render(); } }, "Remove");
        return h("div", { class: "variant-row", dataset: { field: `variants.${index}` } },
          h("strong", {}, `Variant ${name}`), text, parts,
          h("label", { class: "variant-weight" }, "Weight ", weight), remove,
          h("p", { class: "field-error" }));
      }));
      add.disabled = variants.length >= VARIANT_NAMES.length || hadVariants;
    }
    add.addEventListener("click", () => { variants.push({ text: "", weight: 1 }); render(); });

    function sync() {
      const on = abOn.checked;
      const textField = textInput.closest(".field");
      if (textField) textField.hidden = on;
      textInput.required = !on;
      abPart.hidden = !on;
      if (on && !hadVariants && !variants[0].text && textInput.value) {
        variants[0].text = textInput.value;
        render();
      }
    }
    abOn.addEventListener("change", sync);
    render();
    const abPart = h("div", { class: "ab-part", dataset: { field: "variants" } },
      h("p", { class: "hint" }, "Each client gets one text, by weight, the same every time; the statistics count each text apart."),
      rows, h("div", { class: "form-actions" }, add), h("p", { class: "field-error" }));
    const element = h("fieldset", { class: "wide campaign", id: "campaign-fields" },
      h("legend", {}, "A/B test, holdout, frequency cap"),
      h("div", { class: "row" }, abOn, h("label", { for: "ab-on" }, "A/B test: send 2 to 5 texts")),
      abPart,
      field("Holdout (% of the audience)", holdout, { hint: "0-50: these clients get nothing and are counted apart, to measure the campaign against" }),
      field("Service message: exempt from the frequency cap", exempt, { check: true }));

    function apply(body) {
      if (abOn.checked) {
        body.variants = variants.map((v) => ({ text: v.text, weight: v.weight }));
        delete body.text;
      }
      body.holdout_percent = Number(holdout.value || 0);
      body.frequency_cap_exempt = exempt.checked;
    }
    return { element, apply, sync };
  }

  /** A mailing's A/B variants side by side, each with its share and sent count, and its
   * holdout group. */
  function variantPanel(mailing, answer) {
    const variants = (answer && answer.variants) || mailing.variants;
    const heldOut = answer && answer.skipped_by_reason ? answer.skipped_by_reason.holdout : (mailing.skipped_by_reason || {}).holdout || 0;
    if (!variants && !mailing.holdout_percent) return [];
    const total = (variants || []).reduce((sum, v) => sum + v.weight, 0);
    const cards = (variants || []).map((v, index) => h("div", { class: "variant-card", dataset: { variant: VARIANT_NAMES[index] } },
      h("h3", {}, `Variant ${VARIANT_NAMES[index]}`),
      h("p", { class: "quote" }, v.text),
      h("p", { class: "hint" }, `Weight ${v.weight} (${Math.round((v.weight / total) * 100)}% of those not held out)`),
      h("p", { class: "variant-sent" }, h("strong", { "data-count": `variant-${VARIANT_NAMES[index]}` }, String(v.sent)), " sent")));
    if (mailing.holdout_percent) {
      cards.push(h("div", { class: "variant-card holdout", dataset: { variant: "holdout" } },
        h("h3", {}, "Holdout"),
        h("p", { class: "hint" }, `${mailing.holdout_percent}% of the audience, never sent to`),
        h("p", { class: "variant-sent" }, h("strong", { "data-count": "holdout" }, String(heldOut)), " held out")));
    }
    return [h("h2", { id: "variants-title" }, variants ? "A/B variants" : "Holdout"), h("div", { class: "variant-cards" }, cards)];
  }

  // ------------------------------------------------------------------ gateway

  /** A rate as an operator says it: "25/s", "0.5/s". */
  function perSecond(rate) {
    return `${rate >= 10 ? Math.round(rate) : Math.round(rate * 10) / 10}/s`;
  }

  function percent(ratio) {
    return `${Math.round(ratio * 100)}%`;
  }

  /** What the gateway does to sending now, and why, in one sentence. */
  function gatewayHeadline(g) {
    const a = g.answers;
    // Most failed calls were "slow down" answers (429, or 503 with Retry-After).
    const overloaded = a.overload > 0 && a.overload * 2 >= a.calls - a.accepted;
    const of = perSecond(g.configured_rate);
    const why = g.last_slowdown ? ` — ${g.last_slowdown.reason}` : "";
    if (g.state === "probing") {
      return overloaded
        ? `Gateway overloaded: it answers every call with "slow down"; probing at ${perSecond(g.current_rate)} of ${of} until it accepts one.`
        : `Gateway down: probing at ${perSecond(g.current_rate)} of ${of} until a call succeeds${why}.`;
    }
    if (g.state === "paused") {
      return `Gateway overloaded: sending at ${perSecond(g.configured_rate * g.speed)} of ${of}, paused ${Math.ceil(g.pause_seconds)} s${why}.`;
    }
    if (g.state === "slowed") {
      return `Gateway ${overloaded ? "overloaded" : "struggling"}: sending at ${perSecond(g.current_rate)} of ${of}, climbing back${why}.`;
    }
    if (g.degraded) {
      return `Gateway unreliable: only ${percent(g.accept_ratio)} of calls accepted; sending at the full ${of}, failed calls are retried.`;
    }
    return `Gateway healthy: sending at up to ${of}.`;
  }

  function gatewayDetails(g) {
    const a = g.answers;
    const minutes = Math.round(g.window_seconds / 60);
    const count = (label, key, value) => h("div", { class: "count" }, h("dt", {}, label), h("dd", { "data-count": key }, String(value)));
    return [
      h("p", { class: "gateway-headline" }, gatewayHeadline(g)),
      h("p", {}, a.calls
        ? `Accepted: ${percent(g.accept_ratio)} of ${a.calls} ${a.calls === 1 ? "call" : "calls"} over the last ${minutes} minutes.`
        : `No gateway calls in the last ${minutes} minutes.`),
      a.calls ? h("dl", { class: "counts gateway-answers" },
        count("accepted", "accepted", a.accepted),
        count("asked to slow down", "overload", a.overload),
        count("failed at random", "bad_luck", a.bad_luck),
        count("retries granted", "retries", a.retries)) : null,
      g.last_slowdown
        ? h("p", { class: "hint" }, `Sending last slowed at ${clock.format(new Date(g.last_slowdown.at))}: ${g.last_slowdown.reason}.`)
        : null,
      g.operators.length
        ? h("p", { class: "hint" }, `Operator limits: ${g.operators.map((o) => `${o.code} at ${perSecond(o.configured_rate)}${o.deferring ? ` (messages waiting for its rate, ${Math.ceil(o.reserved_ahead_seconds)} s of slots taken ahead)` : ""}`).join(", ")}.`)
        : null,
    ];
  }

  /** A panel with the gateway's back-pressure state (GET /gateway), refreshed like the rest of
   * the page; `onlyWhenDegraded` keeps it hidden while the gateway is healthy. */
  function gatewayPanel(view, { onlyWhenDegraded = false } = {}) {
    const content = h("div", { id: "gateway-state", "aria-live": "polite" });
    const section = h("section", { class: "panel gateway", id: "gateway-panel", "aria-labelledby": "gateway-title", hidden: onlyWhenDegraded },
      h("h2", { id: "gateway-title" }, "Gateway"), content);
    let missing = false;
    every(POLL_MS, async () => {
      if (missing) return;
      let g;
      try {
        g = await api("GET", "gateway");
      } catch (err) {
        if (!current(view)) return;
        if (unavailable(err)) {
          missing = true; // an older server without the route: nothing to show
          section.hidden = true;
        } else if (!onlyWhenDegraded) {
          fill(content, h("p", { class: "hint" }, `The gateway's state could not be read (${err.message}); retrying…`));
        }
        return;
      }
      if (!current(view)) return;
      section.hidden = onlyWhenDegraded && !g.degraded;
      section.className = `panel gateway gateway-${cssToken(g.state)}${g.degraded ? " degraded" : ""}`;
      fill(content, gatewayDetails(g));
    });
    return section;
  }

  // ------------------------------------------------------------------ statistics

  async function statsView(mailingId) {
    const view = state.view;
    const id = encodeURIComponent(mailingId);
    document.title = "Mailing statistics · SMS campaigns admin";
    let mailing = await api("GET", `mailings/${id}`);
    if (!current(view)) return;
    const samples = [];

    const title = h("h1", { id: "mailing-heading" }, "Mailing ", h("span", { id: "mailing-status" }, mailingBadge(mailing.status, mailing.stats)));
    const text = h("p", { class: "quote", id: "mailing-text" }, mailing.text);
    const meta = h("dl", { class: "meta" });
    const actions = h("div", { class: "actions", id: "mailing-actions" });
    const progressLabel = h("p", { id: "progress-label" });
    const bar = h("div", { class: "progress-bar" });
    const progress = h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": 0, "aria-labelledby": "progress-label" }, bar);
    const counts = h("dl", { class: "counts", id: "status-counts" });
    const delivery = h("p", { id: "delivery-summary" }, deliverySummary(mailing.delivery));
    const abPanel = h("section", { class: "panel", id: "variants-panel", "aria-labelledby": "variants-title", hidden: true });
    // Why the skipped messages were not sent ("2 frequency cap, 1 opted out").
    const skipReasons = h("p", { class: "hint", id: "skip-reasons", hidden: true });
    const showVariants = (answer) => {
      const reasons = Object.entries((answer || mailing).skipped_by_reason || {}).filter(([, n]) => n > 0);
      skipReasons.hidden = !reasons.length;
      skipReasons.textContent = reasons.length
        ? `Skipped: ${reasons.map(([reason, n]) => `${n} ${reason.replace("_", " ")}`).join(", ")}`
        : "";
      const parts = variantPanel(mailing, answer);
      abPanel.hidden = !parts.length;
      fill(abPanel, ...parts);
    };
    const chart = h("div", { id: "chart" });
    const failedPart = h("div", { id: "failed-messages" });
    // Shown only while there are failed messages to retry.
    const retry = h("button", { type: "button", id: "retry-failed", class: "secondary", hidden: true }, "Retry failed");
    let lastStats = mailing.stats || {};
    const updated = h("p", { class: "hint", id: "updated", "aria-live": "off" });

    const retryKeys = idempotencyKeys();
    retry.addEventListener("click", async () => {
      retry.disabled = true;
      try {
        const answer = await api("POST", `mailings/${id}/retry-failed`, { idempotencyKey: retryKeys.for(null) });
        retryKeys.done();
        flash(`Requeued ${answer.requeued} failed ${answer.requeued === 1 ? "message" : "messages"}.`);
        if (answer.mailing) renderMailing(answer.mailing);
        loadHistory();
        lastFailed = -1;
      } catch (err) {
        flash(unavailable(err) ? "Retrying failed messages is not available on this server." : `Retry failed: ${err.message}`, { error: true });
        retry.disabled = false;
      }
    });

    function renderMailing(next) {
      mailing = next;
      fill(title, "Mailing ", h("span", { id: "mailing-status" }, mailingBadge(mailing.status, lastStats)));
      text.textContent = mailing.text;
      const f = mailing.filter || { operator_codes: [], tags: [] };
      fill(meta,
        h("dt", {}, "Start"), h("dd", {}, when(mailing.start_at)),
        h("dt", {}, "End"), h("dd", {}, when(mailing.end_at)),
        h("dt", {}, "Operator codes"), h("dd", {}, f.operator_codes.length ? f.operator_codes.join(", ") : "any"),
        h("dt", {}, "Tags"), h("dd", {}, f.tags.length ? f.tags.join(", ") : "any"),
        h("dt", {}, "Send window"), h("dd", {}, mailing.send_window ? `${mailing.send_window.start}–${mailing.send_window.end} local time` : "any time"),
        mailing.parts ? [h("dt", {}, "SMS parts"), h("dd", { id: "mailing-parts" }, mailingParts(mailing))] : null,
        h("dt", {}, "Id"), h("dd", {}, h("code", {}, mailing.id)),
      );
      fill(actions, ...mailingActions(mailing, async (m) => { renderMailing(m); await poll(); await loadHistory(); }), writer(retry));
    }

    // Who created, edited, paused or cancelled the mailing, and when: its audit trail.
    const history = h("div", { id: "mailing-history" });
    async function loadHistory() {
      let page;
      try {
        page = await api("GET", "audit", { query: { target: mailingId, limit: 50 } });
      } catch (err) {
        if (!current(view)) return;
        fill(history, h("p", { class: "muted" }, unavailable(err) ? "The history is not available to this sign-in." : `The history cannot be read: ${err.message}`));
        return;
      }
      if (!current(view)) return;
      if (!page.items.length) {
        fill(history, h("p", { class: "muted" }, "No changes recorded."));
        return;
      }
      fill(history,
        h("table", { class: "cards", id: "history-table" },
          h("thead", {}, h("tr", {}, ["When", "Who", "What", "Fields"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, page.items.map((e) => h("tr", { dataset: { action: e.action } },
            h("td", { "data-label": "When" }, when(e.at)),
            h("td", { "data-label": "Who" }, h("code", {}, e.actor.id), e.actor.role ? ` (${e.actor.role})` : ""),
            h("td", { "data-label": "What" }, HISTORY_ACTIONS[e.action] || e.action),
            h("td", { "data-label": "Fields", class: "text" }, e.fields.length ? e.fields.join(", ") : "—"))))),
        page.next_cursor ? h("p", { class: "hint" }, `Showing the latest ${page.items.length} changes.`) : null,
      );
    }

    function renderStats(status, stats) {
      const endedWithFailures = failures(stats) > 0 && failures(lastStats) === 0;
      lastStats = stats;
      if (status !== mailing.status || endedWithFailures) renderMailing({ ...mailing, status });
      const total = stats.total || 0;
      const done = total - (stats.pending || 0);
      const percent = total ? Math.round((done / total) * 100) : 0;
      bar.style.width = `${percent}%`;
      progress.setAttribute("aria-valuenow", String(percent));
      // "Done" counts failed and expired messages too: say how many never arrived.
      const lost = [["failed", stats.failed], ["expired", stats.expired]].filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k}`);
      progressLabel.textContent = total
        ? `${done} of ${total} messages done (${percent}%)${lost.length ? `, ${lost.join(", ")}` : ""}`
        : status === "scheduled" ? "Not started yet" : "No messages";
      fill(counts,
        h("div", { class: "count s-total" }, h("dt", {}, "total"), h("dd", { "data-count": "total" }, String(total))),
        statusKeys(stats).map((key) => h("div", { class: `count s-${cssToken(key)}` }, h("dt", {}, key), h("dd", { "data-count": key }, String(stats[key])))),
      );
      retry.hidden = !(stats.failed > 0);
      retry.disabled = retry.hidden;
    }

    let lastFailed = -1;
    async function loadFailed(failed) {
      if (failed === lastFailed) return;
      lastFailed = failed;
      if (!failed) {
        fill(failedPart, h("p", { class: "muted" }, "No failed messages."));
        return;
      }
      const page = await api("GET", `mailings/${id}/stats`, { query: { status: "failed", limit: 100 } });
      if (!current(view)) return;
      fill(failedPart,
        h("table", { class: "cards", id: "failed-table" },
          h("thead", {}, h("tr", {}, ["Message", "Phone", "Attempts", "Last error"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, page.messages.map((m) => h("tr", {},
            h("td", { "data-label": "Message" }, String(m.id)),
            h("td", { "data-label": "Phone" }, m.phone),
            h("td", { "data-label": "Attempts", class: "num" }, String(m.attempts)),
            h("td", { "data-label": "Last error", class: "text" }, m.last_error || "—"))))),
        page.next_cursor ? h("p", { class: "hint" }, `Showing the first ${page.messages.length} failed messages.`) : null,
      );
    }

    async function poll() {
      let answer;
      try {
        answer = await api("GET", `mailings/${id}/stats`, { query: { limit: 1 } });
      } catch (err) {
        if (current(view)) updated.textContent = `Update failed (${err.message}); retrying…`;
        return;
      }
      if (!current(view)) return;
      samples.push({ at: Date.now(), stats: answer.stats });
      if (samples.length > 900) samples.splice(0, samples.length - 900);
      renderStats(answer.status, answer.stats);
      delivery.textContent = deliverySummary(answer.delivery);
      showVariants(answer);
      fill(chart, drawChart(samples, chart.clientWidth));
      updated.textContent = `Updated ${clock.format(new Date())}; refreshes every ${POLL_MS / 1000} s.`;
      await loadFailed(answer.stats.failed || 0).catch(() => {});
    }

    // The history so far (kept on the server as the counters move); live samples follow it.
    try {
      const history = await api("GET", `mailings/${id}/timeline`);
      if (!current(view)) return;
      for (const point of history.points) samples.push({ at: Date.parse(point.at), stats: point.stats });
    } catch (err) {
      // An older server without the timeline: the chart starts with the live samples.
    }

    renderMailing(mailing);
    showVariants(null);
    mount(
      h("p", {}, h("a", { href: "#/mailings" }, "← Mailings")),
      h("section", { class: "panel", "aria-labelledby": "mailing-heading" }, title, text, meta, actions),
      h("section", { class: "panel", "aria-labelledby": "progress-title" },
        h("h2", { id: "progress-title" }, "Progress"), progressLabel, progress, counts, delivery, skipReasons, updated),
      abPanel,
      gatewayPanel(view),
      h("section", { class: "panel", "aria-labelledby": "chart-title" },
        h("h2", { id: "chart-title" }, "Over time"),
        h("p", { class: "hint" }, "The history kept as messages change, then live every few seconds."), chart),
      h("section", { class: "panel", "aria-labelledby": "failed-title" },
        h("h2", { id: "failed-title" }, "Failed messages"), failedPart),
      h("section", { class: "panel", "aria-labelledby": "history-title" },
        h("h2", { id: "history-title" }, "History"), history),
    );
    loadHistory();
    every(POLL_MS, poll);
  }

  /** The mailing's delivery receipts in a sentence ("sent" is only the gateway's acceptance). */
  function deliverySummary(delivery) {
    if (!delivery || !(delivery.delivered + delivery.undelivered)) {
      return "Delivery: no receipts from the gateway yet.";
    }
    const rate = delivery.delivered_rate === null ? "" : `; delivered rate ${percent(delivery.delivered_rate)} of sent`;
    return `Delivery: ${delivery.delivered} delivered, ${delivery.undelivered} undelivered${rate}.`;
  }

  /** A line per status over the samples taken while the page is open, as inline SVG. */
  function drawChart(samples, available) {
    // Drawn at the size it is shown, so its labels stay readable on a phone.
    const width = Math.max(280, Math.min(1000, Math.round(available || 640)));
    const height = width < 500 ? 180 : 220;
    const left = 44;
    const right = 12;
    const top = 12;
    const bottom = 28;
    const keys = statusKeys(samples[samples.length - 1].stats).filter((key) =>
      samples.some((s) => (s.stats[key] || 0) > 0) || key === "sent" || key === "pending");
    const start = samples[0].at;
    const span = Math.max(samples[samples.length - 1].at - start, 1);
    const max = Math.max(1, ...samples.flatMap((s) => keys.map((k) => s.stats[k] || 0)));
    const x = (at) => left + ((at - start) / span) * (width - left - right);
    const y = (value) => top + (1 - value / max) * (height - top - bottom);
    const plot = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "chart-desc" });
    const last = samples[samples.length - 1].stats;
    plot.append(svg("title", { id: "chart-desc" },
      `Messages by status over ${Math.round(span / 1000)} s: ${keys.map((k) => `${k} ${last[k] || 0}`).join(", ")}`));
    plot.append(
      svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }),
      svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }),
      svg("text", { class: "label", x: left - 6, y: top + 4, "text-anchor": "end" }, String(max)),
      svg("text", { class: "label", x: left - 6, y: height - bottom + 4, "text-anchor": "end" }, "0"),
      svg("text", { class: "label", x: left, y: height - 8 }, axisClock.format(new Date(start))),
      svg("text", { class: "label", x: width - right, y: height - 8, "text-anchor": "end" }, axisClock.format(new Date(samples[samples.length - 1].at))),
    );
    for (const key of keys) {
      const token = cssToken(key);
      if (samples.length === 1) {
        plot.append(svg("circle", { class: `dot s-${token}`, cx: x(samples[0].at), cy: y(samples[0].stats[key] || 0), r: 3 }));
      } else {
        const points = samples.map((s) => `${x(s.at).toFixed(1)},${y(s.stats[key] || 0).toFixed(1)}`).join(" ");
        plot.append(svg("polyline", { class: `line s-${token}`, points }));
      }
    }
    const legend = h("p", { class: "legend" }, keys.map((key) =>
      h("span", {}, h("span", { class: `swatch s-${cssToken(key)}` }), `${key} ${last[key] || 0}`)));
    return h("div", {}, plot, legend);
  }

  // ------------------------------------------------------------------ start

  async function boot() {
    document.getElementById("sign-out").addEventListener("click", () => {
      signOut(null);
      flash("Signed out.");
    });
    try {
      const response = await fetch(apiUrl("admin/config.json"), { headers: { Accept: "application/json" } });
      if (response.ok) state.config = await response.json();
    } catch {
      // Without the configuration, token sign-in still works.
    }
    const params = new URLSearchParams(location.search);
    if (params.has("state") && (params.has("code") || params.has("error"))) {
      await finishSingleSignOn(params);
    }
    // Listening only now: a hash change while booting is shown once, by this first route,
    // not a second time (a form rendered again loses what the operator has typed).
    window.addEventListener("hashchange", route);
    route();
  }

  boot();
})();
