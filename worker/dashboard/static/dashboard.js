// cronsul dashboard: live updates by short polling, and actions without a page reload.
// Served as a file (the Content-Security-Policy forbids inline script). No dependencies.
(function () {
  "use strict";
  var body = document.body;
  var live = document.getElementById("live");
  var flash = document.getElementById("flash");
  var updated = document.getElementById("updated");
  var api = body.getAttribute("data-api");
  var every = parseInt(body.getAttribute("data-poll") || "2000", 10);
  var final = body.getAttribute("data-final") === "1";
  var last = null;
  var timer = null;
  var busy = false;

  function schedule(ms) {
    if (timer) { clearTimeout(timer); }
    timer = final ? null : setTimeout(refresh, ms);
  }

  function refresh() {
    if (!live || !api) { return; }
    if (busy) { schedule(every); return; }
    busy = true;
    fetch(api, { headers: { "Accept": "application/json" }, credentials: "same-origin",
                 cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (doc) {
        // The server escapes every value in doc.html (worker/dashboard/markup.py).
        if (doc.html !== last) { live.innerHTML = doc.html; last = doc.html; }
        if (doc.final) { final = true; }
        body.classList.remove("stale");
        if (updated) { updated.textContent = new Date().toLocaleTimeString(); }
      })
      .catch(function () { body.classList.add("stale"); })
      .then(function () { busy = false; schedule(every); });
  }

  function say(text, ok, runId) {
    if (!flash) { return; }
    flash.textContent = "";
    var p = document.createElement("p");
    p.className = "flash " + (ok ? "ok" : "error");
    p.textContent = text;
    if (runId) {
      var a = document.createElement("a");
      a.href = "/runs/" + encodeURIComponent(runId);
      a.textContent = " open run";
      p.appendChild(a);
    }
    flash.appendChild(p);
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList || !form.classList.contains("act") ||
        form.getAttribute("action") === "/logout") { return; }
    event.preventDefault();
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { return; }
    var button = form.querySelector("button");
    if (button) { button.disabled = true; }
    fetch(form.getAttribute("action"), {
      method: "POST", credentials: "same-origin",
      headers: { "Accept": "application/json" },
      body: new URLSearchParams(new FormData(form))
    })
      .then(function (r) { return r.json().catch(function () { return { ok: false, error: "HTTP " + r.status }; }); })
      .then(function (doc) {
        say(doc.ok ? doc.message : doc.error, doc.ok, doc.run_id);
        if (doc.ok && form.classList.contains("run-now")) { form.reset(); }
      })
      .catch(function (e) { say("request failed: " + e, false); })
      .then(function () {
        if (button) { button.disabled = false; }
        schedule(0);
      });
  });

  schedule(every);
}());
