// Click a thumbnail to see it larger with all its labels; Escape or a click outside closes it.
// Captions are copied as DOM nodes (never as HTML strings), so escaped data stays text.
(function () {
  "use strict";
  var box = document.getElementById("lightbox");
  if (!box) { return; }
  var image = box.querySelector(".lightbox-image");
  var info = box.querySelector(".lightbox-info");
  var closer = box.querySelector(".lightbox-close");
  var opener = null;

  function open(link) {
    var item = link.closest(".item");
    var thumb = link.querySelector("img");
    image.src = link.getAttribute("href");
    image.alt = thumb ? thumb.alt : "";
    image.className = "lightbox-image" + (thumb && thumb.classList.contains("pixelated") ? " pixelated" : "");
    while (info.firstChild) { info.removeChild(info.firstChild); }
    var details = item ? item.querySelector(".info") : null;
    if (details) { info.appendChild(details.cloneNode(true)); }
    opener = link;
    box.hidden = false;
    closer.focus();
  }

  function close() {
    box.hidden = true;
    image.removeAttribute("src");
    if (opener) { opener.focus(); opener = null; }
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a.thumb") : null;
    if (link) {
      event.preventDefault();
      open(link);
    } else if (!box.hidden && (event.target === box || event.target === closer)) {
      close();
    }
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && !box.hidden) { close(); }
  });
})();
