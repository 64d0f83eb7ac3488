// segicl annotate: the page. Plain JavaScript, no dependency, talks only to the server it came from.
// Interactions are kept here in image pixels, (row, col), and the full list is POSTed on every change;
// the server answers with the predicted mask as a PNG data URL.
"use strict";

const KINDS = ["pos_points", "neg_points", "boxes", "pos_scribbles", "neg_scribbles"];
const COLORS = { pos: "#35d46a", neg: "#ff5252", box: "#ffd54f", mask: [0, 229, 255] };
const FILL_ALPHA = 90;   // of 255: the mask's inside; its outline is opaque
const ERASE_RADIUS = 12; // screen pixels

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

let app = null;          // the server's /api/state
let name = null;         // the open image
let image = null;        // its HTMLImageElement
let ints = empty();      // its interactions
let history = [];        // JSON snapshots of ints, for undo
let maskCanvas = null;   // the prediction, coloured, at image resolution
let mode = "click";
let drag = null;         // {kind, neg, start, points, changed}
let scale = 1;
let seq = 0;             // predict requests sent
let shownSeq = 0;        // the newest one whose answer is shown
let area = null;         // foreground pixels of the shown prediction

function empty() { return Object.fromEntries(KINDS.map((k) => [k, []])); }

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const r = await fetch(path, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function message(text, isError) {
  const m = $("message");
  m.textContent = text ? "· " + text : "";
  m.className = isError ? "error" : "";
  m.dataset.hint = text && text.startsWith("nothing to go on") ? "1" : "";
}

// ------------------------------------------------------------------------------ state and images
function showState(s) {
  app = s;
  const secs = s.last_seconds == null ? "–" : s.last_seconds.toFixed(2) + " s";
  $("progress").textContent = `${s.n_accepted} / ${s.total} accepted · context ${s.context} · ` +
    `last prediction ${secs} · order ${s.order}` + (s.text ? ` · "${s.text}"` : "");
  const list = $("images");
  list.replaceChildren(...s.images.map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    li.title = "open this image";
    if (s.accepted.includes(n)) li.className = "accepted";
    else if (s.skipped.includes(n)) li.className = "skipped";
    if (n === s.current) li.classList.add("current");
    li.addEventListener("click", () => goto(n));
    return li;
  }));
  const cur = list.querySelector(".current");
  if (cur) cur.scrollIntoView({ block: "nearest" });
  fillList("errors", s.errors.map((e) => `${e.file}: ${e.error}`));
  fillList("notes", s.notes);
}

function fillList(id, lines) {
  $(id + "-box").hidden = lines.length === 0;
  $(id).replaceChildren(...lines.map((t) => { const li = document.createElement("li"); li.textContent = t; return li; }));
}

async function open(s) {
  showState(s);
  name = s.current;
  $("done").hidden = name !== null;
  canvas.hidden = name === null;
  if (name === null) { document.body.dataset.busy = "0"; $("name").textContent = ""; return; }
  ints = Object.assign(empty(), s.interactions || {});
  history = [];
  maskCanvas = null;
  area = null;
  image = new Image();
  image.src = "/api/image?name=" + encodeURIComponent(name);
  await image.decode();
  layout();
  $("name").textContent = `${name} (${image.width}×${image.height})`;
  message(s.proposal || (s.accepted.includes(name) ? "accepted already: Accept again replaces its mask" : ""));
  draw();
  await predict();
}

function layout() {
  const maxW = Math.max(256, $("stage").clientWidth);
  const maxH = Math.max(256, window.innerHeight - 150);
  scale = Math.min(maxW / image.width, maxH / image.height, 8);
  canvas.width = Math.round(image.width * scale);
  canvas.height = Math.round(image.height * scale);
}

// ------------------------------------------------------------------------------ prediction
async function predict() {
  const mine = ++seq;
  document.body.dataset.busy = "1";
  try {
    const r = await api("/api/predict", { image: name, interactions: ints });
    if (mine < shownSeq || r.image !== name) return;
    shownSeq = mine;
    maskCanvas = await colourMask(r.mask);
    $("area").textContent = `mask ${r.area} px · mean uncertainty ${r.uncertainty.toFixed(3)}`;
    $("area").dataset.area = r.area;
    area = r.area;
    app.last_seconds = r.seconds;
    showState(app);
    if (r.area === 0 && app.context === 0 && !KINDS.some((k) => ints[k].length)) {
      message("nothing to go on yet: click on the structure, or drag a box around it (Box mode)");
    } else if ($("message").className === "error" || $("message").dataset.hint) {
      message(app.proposal || "");
    }
    draw();
  } catch (e) {
    if (e.message.includes("left out")) {  // the image failed to decode: the server moved on
      await open(await api("/api/state"));
      message(e.message, true);
      return;
    }
    message(e.message, true);
  } finally {
    if (mine === seq) document.body.dataset.busy = "0";
  }
}

async function colourMask(dataUrl) {
  const m = new Image();
  m.src = dataUrl;
  await m.decode();
  const c = document.createElement("canvas");
  c.width = m.width; c.height = m.height;
  const g = c.getContext("2d");
  g.drawImage(m, 0, 0);
  const px = g.getImageData(0, 0, c.width, c.height);
  const w = c.width, h = c.height, d = px.data;
  const on = new Uint8Array(w * h);
  for (let i = 0; i < w * h; i++) on[i] = d[4 * i] > 127 ? 1 : 0;
  const [r, gr, b] = COLORS.mask;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      // the outline (a foreground pixel beside background or the border) opaque, the inside translucent
      const edge = on[i] && (x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !on[i - 1] || !on[i + 1] || !on[i - w] || !on[i + w]);
      d[4 * i] = r; d[4 * i + 1] = gr; d[4 * i + 2] = b;
      d[4 * i + 3] = edge ? 255 : on[i] ? FILL_ALPHA : 0;
    }
  }
  g.putImageData(px, 0, 0);
  return c;
}

// ------------------------------------------------------------------------------ drawing
function draw() {
  if (!image) return;
  ctx.imageSmoothingEnabled = scale < 1;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (maskCanvas && $("overlay").checked) ctx.drawImage(maskCanvas, 0, 0, canvas.width, canvas.height);
  const sx = (p) => (p[1] + 0.5) * scale, sy = (p) => (p[0] + 0.5) * scale;
  const dot = (p, colour) => {
    ctx.beginPath(); ctx.arc(sx(p), sy(p), 5, 0, 2 * Math.PI);
    ctx.fillStyle = colour; ctx.fill(); ctx.lineWidth = 1.5; ctx.strokeStyle = "#000"; ctx.stroke();
  };
  const line = (pts, colour) => {
    if (!pts.length) return;
    ctx.beginPath(); ctx.lineWidth = 3; ctx.lineJoin = "round"; ctx.strokeStyle = colour;
    ctx.moveTo(sx(pts[0]), sy(pts[0]));
    for (const p of pts.slice(1)) ctx.lineTo(sx(p), sy(p));
    if (pts.length === 1) ctx.lineTo(sx(pts[0]) + 0.1, sy(pts[0]));
    ctx.stroke();
  };
  const rect = (b) => {
    ctx.lineWidth = 2; ctx.strokeStyle = COLORS.box;
    ctx.strokeRect(b[1] * scale, b[0] * scale, (b[3] - b[1] + 1) * scale, (b[2] - b[0] + 1) * scale);
  };
  ints.boxes.forEach(rect);
  ints.pos_scribbles.forEach((s) => line(s, COLORS.pos));
  ints.neg_scribbles.forEach((s) => line(s, COLORS.neg));
  ints.pos_points.forEach((p) => dot(p, COLORS.pos));
  ints.neg_points.forEach((p) => dot(p, COLORS.neg));
  if (drag && drag.kind === "box") rect(boxOf(drag.start, drag.points[drag.points.length - 1]));
  if (drag && drag.kind === "scribble") line(drag.points, drag.neg ? COLORS.neg : COLORS.pos);
  if (drag && drag.kind === "erase") {
    const p = drag.points[drag.points.length - 1];
    ctx.beginPath(); ctx.arc(sx(p), sy(p), ERASE_RADIUS, 0, 2 * Math.PI);
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 1; ctx.stroke();
  }
}

function boxOf(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

// ------------------------------------------------------------------------------ interactions
function pixel(ev) {
  const r = canvas.getBoundingClientRect();
  const row = Math.floor((ev.clientY - r.top) / scale), col = Math.floor((ev.clientX - r.left) / scale);
  return [Math.min(Math.max(row, 0), image.height - 1), Math.min(Math.max(col, 0), image.width - 1)];
}

function change(fn) {
  history.push(JSON.stringify(ints));
  fn();
  draw();
  predict();
}

function erase(p) {
  const rad = ERASE_RADIUS / scale;
  const near = (q) => Math.hypot(q[0] - p[0], q[1] - p[1]) <= rad;
  const onBox = (b) => {
    const inside = p[0] >= b[0] - rad && p[0] <= b[2] + rad && p[1] >= b[1] - rad && p[1] <= b[3] + rad;
    const deep = p[0] > b[0] + rad && p[0] < b[2] - rad && p[1] > b[1] + rad && p[1] < b[3] - rad;
    return inside && !deep;
  };
  let removed = false;
  for (const k of KINDS) {
    const keep = ints[k].filter((it) => !(k === "boxes" ? onBox(it) : k.endsWith("points") ? near(it) : it.some(near)));
    removed = removed || keep.length !== ints[k].length;
    ints[k] = keep;
  }
  return removed;
}

canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());

canvas.addEventListener("mousedown", (ev) => {
  if (!image || name === null) return;
  ev.preventDefault();
  const p = pixel(ev);
  const neg = ev.button === 2 || ev.shiftKey;
  if (mode === "click") {
    change(() => ints[neg ? "neg_points" : "pos_points"].push(p));
    return;
  }
  drag = { kind: mode, neg, start: p, points: [p], snapshot: JSON.stringify(ints), changed: false };
  if (mode === "erase") drag.changed = erase(p);
  draw();
});

window.addEventListener("mousemove", (ev) => {
  if (!drag) return;
  const p = pixel(ev);
  const last = drag.points[drag.points.length - 1];
  if (p[0] === last[0] && p[1] === last[1]) return;
  if (drag.kind === "box") drag.points = [p];
  else drag.points.push(p);
  if (drag.kind === "erase" && erase(p)) drag.changed = true;
  draw();
});

window.addEventListener("mouseup", () => {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (d.kind === "box") {
    const b = boxOf(d.start, d.points[d.points.length - 1]);
    if (b[2] - b[0] < 2 || b[3] - b[1] < 2) { draw(); message("drag to draw a box (a box needs 3 × 3 pixels)"); return; }
    change(() => ints.boxes.push(b));
  } else if (d.kind === "scribble") {
    change(() => ints[d.neg ? "neg_scribbles" : "pos_scribbles"].push(d.points));
  } else if (d.kind === "erase" && d.changed) {
    history.push(d.snapshot);
    draw();
    predict();
  } else {
    draw();
  }
});

function undo() {
  if (!history.length) { message("nothing to undo"); return; }
  ints = Object.assign(empty(), JSON.parse(history.pop()));
  draw();
  predict();
}

function setMode(m) {
  mode = m;
  document.querySelectorAll("button.mode").forEach((b) => b.classList.toggle("active", b.dataset.mode === m));
}

let stepping = false;     // an accept / skip / goto in flight: further ones wait for it

async function step(path, extra) {
  if (name === null || stepping) return;
  stepping = true;
  document.body.dataset.busy = "1";
  try {
    await open(await api(path, Object.assign({ image: name, interactions: ints }, extra || {})));
  } catch (e) {
    message(e.message, true);
    document.body.dataset.busy = "0";
  } finally {
    stepping = false;
  }
}

function goto(n) { if (n !== name) step("/api/goto", { image: n }); }

document.querySelectorAll("button.mode").forEach((b) => b.addEventListener("click", () => setMode(b.dataset.mode)));
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", () => change(() => { ints = empty(); }));
$("overlay").addEventListener("change", draw);
let emptyConfirmed = false; // asked once per page: a volume has many empty slices

function accept() {
  if (area === 0 && !emptyConfirmed) {
    if (!window.confirm("The mask is empty. Accept it (nothing to segment in this image)? Not asked again.")) return;
    emptyConfirmed = true;
  }
  step("/api/accept");
}

$("accept").addEventListener("click", accept);
$("skip").addEventListener("click", () => step("/api/skip"));

document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT" && ev.target.type !== "checkbox") return;
  const k = ev.key.toLowerCase();
  if (["1", "2", "3", "4"].includes(k)) setMode(["click", "box", "scribble", "erase"][Number(k) - 1]);
  else if (k === "z") undo();
  else if (k === "o") { $("overlay").checked = !$("overlay").checked; draw(); }
  else if (k === "s") step("/api/skip");
  else if (k === "enter") accept();
  else return;
  ev.preventDefault();
});

window.addEventListener("resize", () => { if (image && name !== null) { layout(); draw(); } });

api("/api/state").then(open).catch((e) => message("cannot reach the server: " + e.message, true));
