// The console's only script: times shown in the browser's own zone, and setting and deleting secrets
// through the secrets API (PUT and DELETE, which plain forms cannot send), with the session cookie
// and its CSRF token. Values are sent once and never read back.
"use strict";

// The server writes every time as <time datetime="...Z">YYYY-MM-DD HH:MM:SS UTC</time>; here the same
// instant is written in the browser's zone, named, with the UTC text kept as the tooltip.
(function localTimes() {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const two = (n) => String(n).padStart(2, "0");
  for (const element of document.querySelectorAll("time[datetime]")) {
    const d = new Date(element.getAttribute("datetime"));
    if (Number.isNaN(d.getTime())) continue;
    element.textContent = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} `
      + `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())} ${zone}`;
    element.classList.add("local");
  }
})();

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
      await call("PUT", `/api/${form.dataset.scope}/${path(f.get("server").trim(), f.get("name").trim())}`, { value: f.get("value") });
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
