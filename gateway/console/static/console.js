// The console's only script: live updates by polling, and small conveniences. Every page
// works without it (forms are plain HTML posts); nothing is kept in localStorage.
"use strict";
(function () {
  document.documentElement.classList.add("js");
  var seconds = parseFloat(document.body.getAttribute("data-poll-seconds")) || 3;

  function fetchPart(url, etag) {
    var headers = { "X-Console-Poll": "1" };
    if (etag) headers["If-None-Match"] = etag;
    return fetch(url, { headers: headers, credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (r.status === 401) { window.location.reload(); throw new Error("signed out"); }
      return r;
    });
  }

  function template(html) {
    var t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content;
  }

  function busy(row) {  // a row the person is working in is never replaced under them
    var active = document.activeElement;
    if (active && row.contains(active) && active !== document.body) return true;
    return Array.prototype.some.call(row.querySelectorAll("input:not([type=hidden])"), function (i) { return i.value; });
  }

  // Approvals inbox: merge the fresh rows into the table.
  var inbox = document.getElementById("inbox");
  if (inbox) {
    var etag = inbox.getAttribute("data-etag");
    var status = document.getElementById("inbox-updated");
    var pollInbox = function () {
      if (document.hidden) return;
      fetchPart(inbox.getAttribute("data-live-url"), etag).then(function (r) {
        if (r.status !== 200) return null;
        etag = r.headers.get("ETag");
        document.getElementById("inbox-count").textContent = r.headers.get("X-Inbox-Count");
        return r.text();
      }).then(function (html) {
        if (html === null || html === undefined) return;
        var body = document.getElementById("inbox-rows");
        var fresh = template(html);
        var wanted = {};
        Array.prototype.forEach.call(fresh.querySelectorAll("tr[data-approval]"), function (row) {
          wanted[row.getAttribute("data-approval")] = row;
        });
        var gone = 0;
        Array.prototype.forEach.call(body.querySelectorAll("tr"), function (row) {
          var id = row.getAttribute("data-approval");
          if (!id || !wanted[id]) { if (id) gone++; row.remove(); return; }
          if (row.getAttribute("data-version") !== wanted[id].getAttribute("data-version") && !busy(row)) {
            row.replaceWith(wanted[id]);
          }
          delete wanted[id];
        });
        Object.keys(wanted).forEach(function (id) { body.appendChild(wanted[id]); });
        if (!body.querySelector("tr")) body.appendChild(fresh.querySelector("tr.empty") || template("<tr></tr>"));
        var now = new Date().toLocaleTimeString();
        status.textContent = gone ? "(" + gone + " decided elsewhere, updated " + now + ")" : "(updated " + now + ")";
      }).catch(function () {});
    };
    setInterval(pollInbox, seconds * 1000);
  }

  // Sections that refresh until what they show is final (a payment's timeline, runs).
  ["timeline-section", "runs-section"].forEach(function (id) {
    var section = document.getElementById(id);
    if (!section || section.getAttribute("data-final") === "1") return;
    var timer = setInterval(function () {
      if (document.hidden) return;
      fetchPart(section.getAttribute("data-live-url")).then(function (r) {
        var final = r.headers.get("X-Payment-Final") === "1" || r.headers.get("X-Runs-Active") === "0";
        return r.text().then(function (html) {
          if (r.status !== 200) return;
          if (section.contains(document.activeElement) && document.activeElement !== document.body) return;
          section.replaceChildren(template(html));
          if (final) { section.setAttribute("data-final", "1"); clearInterval(timer); }
        });
      }).catch(function () {});
    }, seconds * 1000);
  });

  // Health: the tables are read again every ten seconds (the 5xx rate needs two samples).
  var health = document.getElementById("health-tables");
  if (health) {
    setInterval(function () {
      if (document.hidden) return;
      fetchPart(window.location.pathname).then(function (r) { return r.status === 200 ? r.text() : null; })
        .then(function (html) {
          if (!html) return;
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("health-tables");
          if (fresh) health.replaceChildren.apply(health, Array.prototype.slice.call(fresh.childNodes));
        }).catch(function () {});
    }, 10000);
  }

  // Manual-match fields only matter for that resolution.
  Array.prototype.forEach.call(document.querySelectorAll("select[data-manual-toggle]"), function (select) {
    var fields = document.getElementById(select.getAttribute("data-manual-toggle"));
    var sync = function () { fields.hidden = select.value !== "manual_match"; };
    select.addEventListener("change", sync);
    sync();
  });

  // Copy a trace command to the clipboard.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (!button || !navigator.clipboard) return;
    navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  });
})();
