"use strict";
(function () {
  // Record uncaught errors in the DOM as well as the console, so a plain DOM dump can show them.
  const errorsEl = document.getElementById("errors");
  window.addEventListener("error", (ev) => {
    const p = document.createElement("p");
    p.textContent = String(ev.message || ev.error);
    errorsEl.appendChild(p);
    errorsEl.hidden = false;
  });
})();

