// The admin page: reads the registry's JSON API with the session cookie and sends approvals,
// revocations and drift acceptances with the session's CSRF token.
// Everything a publisher wrote (names, descriptions, schemas, findings) is untrusted text: it is
// only ever put into the page as text nodes, never as HTML.
"use strict";

(() => {
  const API = "/registry/v1";
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
  const canChange = document.querySelector('meta[name="role"]').content === "admin";

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // el("p", {className: "x"}, "text", child) -> <p class="x">text<child></p>
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.headers["X-CSRF-Token"] = csrfToken;
      init.body = JSON.stringify(body ?? {});
    }
    const response = await fetch(API + path, init);
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (response.status === 401) {
      // The session ended (logout elsewhere, key revoked, role changed): back to the sign-in form.
      location.assign("/admin/login?notice=ended");
      throw new ApiError(401, "signed out");
    }
    if (!response.ok) {
      const message = (data && (data.error || data.detail)) || response.statusText || "request failed";
      throw new ApiError(response.status, `${response.status}: ${typeof message === "string" ? message : JSON.stringify(message)}`);
    }
    return data;
  }

  // `io.example/weather` stays two path segments; each is escaped on its own.
  const serverPath = (name) => name.split("/").map(encodeURIComponent).join("/");
  const versionPath = (name, version) => `/servers/${serverPath(name)}/versions/${encodeURIComponent(version)}`;

  const status = document.getElementById("status");
  function say(message, kind = "info") {
    status.textContent = message;
    status.className = kind;
  }

  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
  const pretty = (value) => (value === undefined || value === null ? "" : JSON.stringify(value, null, 2));
  const scopeOf = (group) => (group ? `group ${group}` : "whole tenant");

  function showList(section, items) {
    section.querySelector(".empty").hidden = items.length > 0;
    const table = section.querySelector("table");
    if (table) table.hidden = items.length === 0;
  }

  // -- pending versions ----------------------------------------------------------------------

  function validationFailed(detail) {
    return detail.status === "failed" || (detail.validation || []).some((check) => !check.ok);
  }

  function renderChecks(validation) {
    if (!validation || validation.length === 0) return el("p", { className: "hint" }, "No checks have run yet.");
    return el(
      "ul",
      { className: "checks" },
      validation.map((check) => {
        // An advisory check (the model review) never fails validation; what it flags is marked, not failed.
        const flagged = check.ok && check.advisory && check.findings && check.findings.length > 0;
        const state = flagged ? "advisory" : check.ok ? "ok" : "failed";
        return el(
          "li",
          { className: `check ${state}`, dataset: { check: check.check } },
          el("span", { className: "mark", "aria-label": flagged ? "flagged (advisory)" : check.ok ? "passed" : "failed" },
             flagged ? "!" : check.ok ? "✓" : "✗"),
          el("strong", {}, check.check),
          check.detail ? el("span", { className: "detail" }, ` ${check.detail}`) : null,
          check.findings && check.findings.length
            ? el(
                "ul",
                { className: "findings" },
                check.findings.map((finding) =>
                  el(
                    "li",
                    {},
                    finding.tool ? el("code", {}, finding.tool) : null,
                    finding.path ? el("code", { className: "path" }, finding.path) : null,
                    " ",
                    finding.message,
                  ),
                ),
              )
            : null,
        );
      }),
    );
  }

  function definitionSide(label, tool) {
    if (!tool) return el("div", { className: "side none" }, el("h5", {}, label), el("p", { className: "hint" }, "—"));
    const { name, description, inputSchema, ...rest } = tool;
    return el(
      "div",
      { className: "side" },
      el("h5", {}, label),
      el("p", { className: "description" }, description || "(no description)"),
      el("p", { className: "label" }, "input schema"),
      el("pre", { className: "schema" }, pretty(inputSchema)),
      Object.keys(rest).length
        ? el("details", { className: "other" }, el("summary", {}, `other fields: ${Object.keys(rest).join(", ")}`), el("pre", {}, pretty(rest)))
        : null,
    );
  }

  function renderDiff(diff) {
    if (!diff) return null;
    const tools = diff.tools || [];
    const unchanged = tools.filter((t) => t.change === "same");
    const changes = tools.filter((t) => t.change !== "same");
    return el(
      "div",
      { className: "diff" },
      el("h4", {}, diff.against ? `Tools compared with approved version ${diff.against}` : "Tools (no version approved before)"),
      changes.map((t) =>
        el(
          "details",
          { className: `tool-change ${t.change}`, open: true, dataset: { tool: t.tool, change: t.change } },
          el("summary", {}, el("code", {}, t.tool), " ", el("span", { className: `badge ${t.change}` }, t.change)),
          el("div", { className: "sides" }, definitionSide("before", t.before), definitionSide("after", t.after)),
        ),
      ),
      unchanged.length
        ? el("p", { className: "unchanged" }, "Unchanged: ", unchanged.map((t, i) => [i ? ", " : "", el("code", {}, t.tool)]))
        : null,
    );
  }

  function offeringSide(label, item) {
    if (!item) return el("div", { className: "side none" }, el("h5", {}, label), el("p", { className: "hint" }, "—"));
    const { description, ...rest } = item;
    return el(
      "div",
      { className: "side" },
      el("h5", {}, label),
      el("p", { className: "description" }, description || "(no description)"),
      Object.keys(rest).length ? el("pre", { className: "schema" }, pretty(rest)) : null,
    );
  }

  // Prompts, resources, resource templates and the server's instructions reach the model as tools do.
  function renderOfferingDiff(diff) {
    const offerings = (diff && diff.offerings) || [];
    if (!offerings.length) return null;
    const unchanged = offerings.filter((o) => o.change === "same");
    const changes = offerings.filter((o) => o.change !== "same");
    const label = (o) => (o.kind === "instructions" ? "instructions" : `${o.kind} ${o.name}`);
    return el(
      "div",
      { className: "offering-diff" },
      el("h4", {}, diff.against ? `Prompts, resources and instructions compared with approved version ${diff.against}` : "Prompts, resources and instructions"),
      changes.map((o) =>
        el(
          "details",
          { className: `offering-change ${o.change}`, open: true, dataset: { kind: o.kind, name: o.name, change: o.change } },
          el("summary", {}, el("code", {}, label(o)), " ", el("span", { className: `badge ${o.change}` }, o.change)),
          el("div", { className: "sides" }, offeringSide("before", o.before), offeringSide("after", o.after)),
        ),
      ),
      unchanged.length
        ? el("p", { className: "offerings-unchanged" }, "Unchanged: ", unchanged.map((o, i) => [i ? ", " : "", el("code", {}, label(o))]))
        : null,
    );
  }

  function approveForm(detail) {
    const failed = validationFailed(detail);
    const group = el("input", { type: "text", name: "group", placeholder: "group (empty: whole tenant)", pattern: "[a-z0-9][a-z0-9._\\-]{0,62}" });
    const override = el("input", { type: "checkbox", name: "override", required: failed });
    const button = el("button", { type: "submit", className: "approve", disabled: detail.status === "validating" }, "Approve");
    const form = el(
      "form",
      { className: "approve-form" },
      el("label", {}, "Approve for ", group),
      failed ? el("label", { className: "override" }, override, " override failed checks") : null,
      button,
      detail.status === "validating" ? el("span", { className: "hint" }, " validation still running") : null,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (failed && !override.checked) {
        say("This version failed validation: tick “override failed checks” to approve it anyway.", "error");
        return;
      }
      button.disabled = true;
      try {
        await api("POST", `${versionPath(detail.name, detail.version)}/approve`, {
          group: group.value.trim() || null,
          override: failed && override.checked,
        });
        say(`Approved ${detail.name} ${detail.version} for ${scopeOf(group.value.trim())}.`, "ok");
        await load();
      } catch (error) {
        say(`Could not approve ${detail.name} ${detail.version}: ${error.message}`, "error");
        button.disabled = false;
      }
    });
    return form;
  }

  function renderPending(detail) {
    const failed = validationFailed(detail);
    return el(
      "article",
      { className: `version ${failed ? "failed" : ""}`, dataset: { name: detail.name, version: detail.version } },
      el(
        "h3",
        {},
        el("span", { className: "name" }, detail.name),
        " ",
        el("span", { className: "version-number" }, detail.version),
        " ",
        el("span", { className: `badge status-${detail.status}` }, detail.status),
      ),
      el(
        "p",
        { className: "meta" },
        `published by ${detail.published_by ?? "?"} on ${when(detail.published_at)}`,
        detail.start_ms != null ? ` · started in ${detail.start_ms} ms` : "",
        detail.memory_bytes != null ? ` · ${(detail.memory_bytes / 1048576).toFixed(1)} MiB` : "",
        detail.artifact_sha256 ? ` · sha256 ${detail.artifact_sha256.slice(0, 12)}…` : "",
      ),
      el("h4", {}, "Validation"),
      renderChecks(detail.validation),
      renderDiff(detail.diff),
      renderOfferingDiff(detail.diff),
      canChange ? approveForm(detail) : null,
    );
  }

  // -- approved versions ---------------------------------------------------------------------

  function renderApproval(server, version, approval) {
    const revoke = canChange ? el("button", { type: "button", className: "revoke" }, "Revoke") : null;
    if (revoke) {
      revoke.addEventListener("click", async () => {
        if (!confirm(`Revoke ${server.name} ${version.version} for ${scopeOf(approval.group)}?`)) return;
        revoke.disabled = true;
        try {
          await api("POST", `${versionPath(server.name, version.version)}/revoke`, { group: approval.group ?? null });
          say(`Revoked ${server.name} ${version.version} for ${scopeOf(approval.group)}.`, "ok");
          await load();
        } catch (error) {
          say(`Could not revoke: ${error.message}`, "error");
          revoke.disabled = false;
        }
      });
    }
    return el(
      "tr",
      { dataset: { name: server.name, version: version.version, group: approval.group ?? "" } },
      el("td", {}, server.name, server.builtin ? el("span", { className: "badge" }, "built-in") : null),
      el("td", {}, version.version),
      el("td", {}, scopeOf(approval.group)),
      el("td", {}, approval.approved_by),
      el("td", {}, when(approval.approved_at)),
      el("td", {}, approval.override ? el("span", { className: "badge failed" }, "override") : ""),
      el("td", {}, revoke),
    );
  }

  // -- drift ---------------------------------------------------------------------------------

  function renderDrift(event, published) {
    const accept = canChange ? el("button", { type: "button", className: "accept" }, "Accept new definition") : null;
    if (accept) {
      accept.addEventListener("click", async () => {
        accept.disabled = true;
        try {
          await api("POST", `/drift/${encodeURIComponent(event.id)}/accept`, {});
          say(`Accepted the new definition of ${event.tool} (${event.server} ${event.version}).`, "ok");
          await load();
        } catch (error) {
          say(`Could not accept: ${error.message}`, "error");
          accept.disabled = false;
        }
      });
    }
    return el(
      "article",
      { className: "drift-event", dataset: { id: event.id, tool: event.tool } },
      el("h3", {}, el("code", {}, event.tool), ` of ${event.server} ${event.version}`),
      el(
        "p",
        { className: "meta" },
        `seen ${when(event.first_seen_at)} – ${when(event.last_seen_at)} · pinned ${(event.pinned_sha256 || "none").slice(0, 12)} · live ${(event.live_sha256 || "").slice(0, 12)}`,
      ),
      el(
        "p",
        { className: "seen-in" },
        `listed in the sandbox of: ${(event.seen_in_sandboxes_of || []).join(", ") || "nobody still known"}`,
      ),
      el("div", { className: "sides" }, definitionSide("as published", published), definitionSide("live now", event.live_definition)),
      accept,
    );
  }

  // -- loading -------------------------------------------------------------------------------

  const details = new Map();
  async function detailOf(name, version) {
    const key = `${name}@${version}`;
    if (!details.has(key)) details.set(key, api("GET", versionPath(name, version)));
    return details.get(key);
  }

  // A drift's key: a tool's name, or `prompt:<name>`, `resource:<uri>`, `template:<uriTemplate>`, `server:instructions`.
  function publishedDefinition(detail, key) {
    const offerings = detail.offerings || {};
    const [kind, ...rest] = key.split(":");
    const name = rest.join(":");
    const lists = { prompt: ["prompts", "name"], resource: ["resources", "uri"], template: ["resourceTemplates", "uriTemplate"] };
    if (key === "server:instructions") return offerings.instructions ? { instructions: offerings.instructions } : null;
    if (rest.length && lists[kind]) return (offerings[lists[kind][0]] || []).find((o) => o[lists[kind][1]] === name) || null;
    return (detail.tools || []).find((t) => t.name === key) || null;
  }

  async function load() {
    details.clear();
    const [servers, drift, usage] = await Promise.all([api("GET", "/servers"), api("GET", "/drift"), api("GET", "/usage")]);

    // Pending: not approved, and published after the newest version that is (versions come oldest
    // first). An older version left behind by a newer approval is superseded, not waiting.
    const pendingVersions = [];
    const approvals = [];
    for (const server of servers.servers || []) {
      const versions = server.versions || [];
      const newestApproved = versions.reduce((last, v, i) => ((v.approvals || []).length ? i : last), -1);
      versions.forEach((version, i) => {
        const live = version.approvals || [];
        if (live.length === 0 && i > newestApproved) pendingVersions.push([server, version]);
        for (const approval of live) approvals.push(renderApproval(server, version, approval));
      });
    }

    const pending = document.getElementById("pending");
    const pendingDetails = await Promise.all(pendingVersions.map(([s, v]) => detailOf(s.name, v.version)));
    pending.querySelector(".list").replaceChildren(...pendingDetails.map(renderPending));
    showList(pending, pendingDetails);

    const approved = document.getElementById("approved");
    approved.querySelector("tbody").replaceChildren(...approvals);
    showList(approved, approvals);

    const driftSection = document.getElementById("drift");
    const events = drift.drift || [];
    const driftNodes = await Promise.all(
      events.map(async (event) => {
        let published = null;
        try {
          published = publishedDefinition(await detailOf(event.server, event.version), event.tool);
        } catch {
          published = null;
        }
        return renderDrift(event, published);
      }),
    );
    driftSection.querySelector(".list").replaceChildren(...driftNodes);
    showList(driftSection, events);

    const usageSection = document.getElementById("usage");
    const rows = (usage.usage || []).map((u) =>
      el(
        "tr",
        { dataset: { tool: u.tool } },
        el("td", {}, u.server),
        el("td", {}, u.version),
        el("td", {}, el("code", {}, u.tool)),
        el("td", { className: "num" }, u.calls),
        el("td", { className: `num ${u.errors ? "errors" : ""}` }, u.errors),
        el("td", { className: "num" }, u.avg_ms == null ? "" : Number(u.avg_ms).toFixed(1)),
        el("td", { className: "num" }, u.max_ms == null ? "" : Number(u.max_ms).toFixed(1)),
      ),
    );
    usageSection.querySelector("tbody").replaceChildren(...rows);
    showList(usageSection, rows);

    document.body.dataset.loaded = String(Date.now());
  }

  load().catch((error) => say(`Could not load the registry: ${error.message}`, "error"));
})();
