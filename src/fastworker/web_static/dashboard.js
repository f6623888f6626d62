// fastworker web: small progressive enhancements. Every page reads the same without them.
(function () {
  "use strict";

  // The overview: every few seconds, fetch the page again and swap in its fresh live section
  // (the server draws the chart; nothing here builds markup from data).
  var live = document.body.dataset.live;
  if (live && window.fetch && window.DOMParser) {
    var every = parseInt(document.body.dataset.interval || "2000", 10);
    var busy = false;
    window.setInterval(function () {
      if (busy || document.hidden) return;
      busy = true;
      fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.text();
        })
        .then(function (text) {
          var fresh = new DOMParser().parseFromString(text, "text/html").getElementById(live);
          var shown = document.getElementById(live);
          if (fresh && shown) shown.replaceWith(document.importNode(fresh, true));
        })
        .catch(function () { /* the next round tries again */ })
        .finally(function () { busy = false; });
    }, every);
  }

  // The lists: a box that ticks every row (hidden without JavaScript, where it cannot work).
  document.querySelectorAll("input.select-all").forEach(function (all) {
    all.hidden = false;
    all.addEventListener("change", function () {
      all.form.querySelectorAll('input[name="id"]').forEach(function (box) {
        box.checked = all.checked;
      });
    });
  });

  // Deleting is for good: ask first.
  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-confirm]") : null;
    if (button && !window.confirm(button.dataset.confirm)) event.preventDefault();
  });
})();
