// The labelling page: builds the items from the sheet's JSON with textContent only, keeps the
// person's labels (in local storage between visits) and downloads them as labels.csv.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("sheet-data").textContent);
  var attributes = data.attributes;
  var rows = data.rows;
  var storageKey = "clipengine-labels-" + data.sheet_id;
  var list = document.getElementById("items");
  var progress = document.getElementById("progress");
  var current = { item: 0, attr: 0 };
  var chosen = rows.map(function () { return attributes.map(function () { return null; }); });
  var cards = [];

  function load() {
    var saved = null;
    try { saved = JSON.parse(window.localStorage.getItem(storageKey) || "null"); } catch (e) { saved = null; }
    if (!saved || saved.length !== rows.length) { return; }
    for (var i = 0; i < rows.length; i++) {
      for (var a = 0; a < attributes.length; a++) {
        var value = saved[i] && saved[i][a];
        if (typeof value === "string" && attributes[a].classes.indexOf(value) >= 0) { chosen[i][a] = value; }
      }
    }
  }

  function save() {
    try { window.localStorage.setItem(storageKey, JSON.stringify(chosen)); } catch (e) { /* private mode */ }
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function build() {
    rows.forEach(function (row, i) {
      var card = element("li", "item");
      card.dataset.index = String(i);
      var image = data.images[i];
      if (image && image.src && image.src.indexOf("data:image/") === 0) {
        var img = element("img", "thumb" + (image.pixelated ? " pixelated" : ""));
        img.src = image.src;
        img.alt = row[0];
        img.width = 128;
        img.height = 128;
        card.appendChild(img);
      } else {
        card.appendChild(element("div", "thumb missing", (image && image.reason) || "no image"));
      }
      var body = element("div", "body");
      body.appendChild(element("p", "path", row[0]));
      var groups = attributes.map(function (attr, a) {
        var group = element("div", "attr");
        group.setAttribute("role", "group");
        group.setAttribute("aria-label", attr.name);
        group.appendChild(element("span", "attr-name", attr.name));
        var buttons = attr.classes.map(function (name, c) {
          var button = element("button", "choice");
          button.type = "button";
          if (c < 10) { button.appendChild(element("span", "key", String((c + 1) % 10))); }
          button.appendChild(document.createTextNode(name));
          button.dataset.value = name;
          if (name === row[attr.predicted]) { button.classList.add("suggested"); }
          button.addEventListener("click", function (event) {
            if (event.detail > 0) { button.blur(); }  // a mouse click: Enter goes on accepting items
            focus(i, a);
            choose(i, a, name);
          });
          group.appendChild(button);
          return button;
        });
        body.appendChild(group);
        return { group: group, buttons: buttons };
      });
      card.appendChild(body);
      var accept = element("button", "accept", "✓ Accept");
      accept.type = "button";
      accept.title = "Take the selected labels of this item as right (Enter)";
      accept.addEventListener("click", function (event) {
        if (event.detail > 0) { accept.blur(); }
        focus(i, current.attr);
        acceptItem(i);
      });
      card.appendChild(accept);
      card.addEventListener("click", function (event) {
        if (event.target === card || event.target.tagName === "IMG") { focus(i, current.attr); }
      });
      list.appendChild(card);
      cards.push({ card: card, groups: groups });
      render(i);
    });
  }

  function selected(i, a) {
    if (chosen[i][a] !== null) { return chosen[i][a]; }
    var predicted = rows[i][attributes[a].predicted];
    return attributes[a].classes.indexOf(predicted) >= 0 ? predicted : null;
  }

  function render(i) {
    var card = cards[i];
    var complete = true;
    attributes.forEach(function (attr, a) {
      var value = selected(i, a);
      card.groups[a].buttons.forEach(function (button) {
        button.setAttribute("aria-pressed", button.dataset.value === value ? "true" : "false");
        button.classList.toggle("confirmed", chosen[i][a] !== null && button.dataset.value === value);
      });
      if (chosen[i][a] === null) { complete = false; }
      card.groups[a].group.classList.toggle("current", i === current.item && a === current.attr);
    });
    card.card.classList.toggle("done", complete);
    card.card.classList.toggle("current", i === current.item);
  }

  function showProgress() {
    var done = 0;
    chosen.forEach(function (values) { if (values.every(function (v) { return v !== null; })) { done += 1; } });
    progress.textContent = done + " of " + rows.length + " items labelled";
  }

  function choose(i, a, name) {
    chosen[i][a] = name;
    save();
    render(i);
    showProgress();
  }

  function clear(i, a) {
    chosen[i][a] = null;
    save();
    render(i);
    showProgress();
  }

  function acceptItem(i) {
    attributes.forEach(function (attr, a) {
      if (chosen[i][a] === null) { chosen[i][a] = selected(i, a); }
    });
    save();
    render(i);
    showProgress();
  }

  function focus(i, a) {
    var previous = current.item;
    current.item = Math.max(0, Math.min(rows.length - 1, i));
    current.attr = Math.max(0, Math.min(attributes.length - 1, a));
    render(previous);
    render(current.item);
    cards[current.item].card.scrollIntoView({ block: "nearest" });
  }

  function csvField(text) {
    return /[",\r\n]/.test(text) ? "\"" + text.replace(/"/g, "\"\"") + "\"" : text;
  }

  function csvText() {
    var lines = [data.header.map(csvField).join(",")];
    rows.forEach(function (row, i) {
      var cells = row.slice();
      attributes.forEach(function (attr, a) { cells[attr.truth] = chosen[i][a] === null ? "" : chosen[i][a]; });
      lines.push(cells.map(csvField).join(","));
    });
    return lines.join("\n") + "\n";
  }

  function download() {
    var blob = new Blob([csvText()], { type: "text/csv;charset=utf-8" });
    var link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = data.file_name;
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || !rows.length) { return; }
    var tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") { return; }
    if (tag === "BUTTON" && (event.key === "Enter" || event.key === " ")) { return; }
    var key = event.key;
    var i = current.item;
    var a = current.attr;
    if (key === "ArrowDown" || key === "j") { focus(i + 1, a); }
    else if (key === "ArrowUp" || key === "k") { focus(i - 1, a); }
    else if (key === "ArrowRight" || key === "l") { focus(i, a + 1); }
    else if (key === "ArrowLeft" || key === "h") { focus(i, a - 1); }
    else if (/^[0-9]$/.test(key)) {
      var c = key === "0" ? 9 : Number(key) - 1;
      if (c < attributes[a].classes.length) { choose(i, a, attributes[a].classes[c]); }
    }
    else if (key === "Enter") { acceptItem(i); focus(i + 1, 0); }
    else if (key === "Backspace" || key === "Delete") { clear(i, a); }
    else { return; }
    event.preventDefault();
  });

  document.getElementById("download").addEventListener("click", download);
  load();
  build();
  showProgress();
})();
