// The console's script (times are times.js's): setting and deleting secrets
// through the secrets API (PUT and DELETE, which plain forms cannot send), with the session cookie
// and its CSRF token. Values are sent once and never read back.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const status = document.getElementById("status");

async function call(method, url, body) {
  const headers = { "X-CSRF-Token": csrf };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch(url, { method, headers, credentials: "same-origin",
                                    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!answer.ok) {
    let message = `${answer.status}`;
    try { message = (await answer.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
}

function path(server, name) {
  return server.split("/").map(encodeURIComponent).join("/") + "/" + encodeURIComponent(name);
}

for (const form of document.querySelectorAll("form.secret-set")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = new FormData(form);
    const value = form.elements.value;
    try {
      // Unless ticked, the API refuses a name no approved server declares, and says which are declared.
      const force = f.get("force") ? "?force=1" : "";
      await call("PUT", `/api/${form.dataset.scope}/${path(f.get("server").trim(), f.get("name").trim())}${force}`,
                 { value: f.get("value") });
      value.value = "";
      location.reload();
    } catch (error) {
      value.value = "";
      status.textContent = `Not set: ${error.message}`;
    }
  });
}

for (const button of document.querySelectorAll("button.secret-delete")) {
  button.addEventListener("click", async () => {
    try {
      await call("DELETE", button.dataset.url);
      location.reload();
    } catch (error) {
      status.textContent = `Not deleted: ${error.message}`;
    }
  });
}
