// Times shown in the browser's own zone, on the console and on /me (gateway/admin/console.py's `when`).
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
