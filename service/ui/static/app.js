// The web page: plain JS, no build step. It only calls the public API: /readyz, /openapi.json, POST /v1/link,
// GET /v1/entities/{id} and GET /v1/entities/{id}/image, with the API key the user typed (sessionStorage only).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const api = (path) => new URL(path, new URL("../", location.href)).toString(); // the page lives at <base>/ui/

const TERM_LABELS = {
  retrieval_score: "retrieval",
  rerank_score: "OT (Sinkhorn)",
  name_score: "name",
  context_name_score: "name in sentence",
  name_tokens_score: "name tokens",
  before_birth_score: "before birth (penalty)",
  after_death_score: "after death (penalty)",
  description_overlap_score: "description overlap",
};

const state = { image: null, imageUrl: null, blobs: [] }; // blobs: KG image URLs of the shown result

function headers() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function apiFetch(path, options = {}) {
  let res;
  try {
    res = await fetch(api(path), { ...options, headers: { ...(options.headers || {}), ...headers() } });
  } catch (e) {
    throw new Error("Cannot reach the service: is it running?");
  }
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    const err = new Error(describeError(res.status, body, res.headers));
    err.code = body && body.error ? body.error.code : null;
    err.status = res.status;
    throw err;
  }
  return res;
}

function showError(text) {
  const box = $("#error");
  box.textContent = text;
  box.hidden = !text;
}

// ------------------------------------------------------------------ form

function markMentionFromSelection() {
  const ta = $("#sentence");
  const sel = ta.value.slice(ta.selectionStart, ta.selectionEnd).trim();
  if (sel) $("#mention").value = sel;
}

function setImage(file) {
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.image = file || null;
  state.imageUrl = file ? URL.createObjectURL(file) : null;
  $("#image-box").hidden = !file;
  $("#image-preview").src = state.imageUrl || "";
  $("#image-name").textContent = file ? `${file.name} (${Math.round(file.size / 1024)} KB)` : "";
  if (!file) $("#image-file").value = "";
}

function setupDrop() {
  const drop = $("#drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) setImage(file);
  });
  $("#image-file").addEventListener("change", (e) => setImage(e.target.files[0]));
  $("#image-clear").addEventListener("click", () => setImage(null));
}

async function checkStatus() {
  const el = $("#status");
  try {
    const res = await fetch(api("readyz"));
    const body = await res.json();
    el.textContent = res.ok ? `ready · index ${body.index_version}` : `not ready: ${body.status}`;
    el.className = `status ${res.ok ? "ok" : "bad"}`;
  } catch (e) {
    el.textContent = "service unreachable";
    el.className = "status bad";
  }
  try { // the server's own top_k cap, from its OpenAPI document
    const doc = await (await fetch(api("openapi.json"))).json();
    for (const schema of Object.values(doc.components.schemas || {})) { // BatchItem: a LinkRequest with an id
      const topK = schema.properties && schema.properties.top_k;
      const max = topK && [topK, ...(topK.anyOf || [])].map((t) => t.maximum).find((m) => m);
      if (max) { $("#top-k").max = max; break; }
    }
    if (doc.components.securitySchemes) { // the server has API keys configured (service/auth.py documents them)
      $("#api-key").placeholder = "required by this server";
      $("#api-key").classList.add("required");
    }
  } catch (e) { /* keep the default */ }
}

async function onSubmit(e) {
  e.preventDefault();
  showError("");
  const mention = $("#mention").value.trim();
  if (!mention) {
    showError("Mark the mention: select its words in the sentence, or type it in the Mention box.");
    return;
  }
  const form = new FormData();
  form.append("mention", mention);
  const sentence = $("#sentence").value.trim();
  if (sentence) form.append("context", sentence);
  form.append("top_k", String($("#top-k").value || 5));
  if (state.image) form.append("image", state.image, state.image.name);
  const explain = $("#explain").checked;
  const btn = $("#link-btn");
  btn.disabled = true;
  btn.textContent = "Linking…";
  try {
    const res = await apiFetch(`v1/link${explain ? "?explain=true" : ""}`, { method: "POST", body: form });
    await render(await res.json());
  } catch (err) {
    $("#result").hidden = true;
    showError(err.message);
  } finally {
    btn.disabled = false;
    btn.textContent = "Link";
  }
}

// ------------------------------------------------------------------ results

function termFields(entities) {
  const fields = [];
  for (const ent of entities) {
    for (const k of Object.keys(ent)) {
      if (k.endsWith("_score") && !fields.includes(k) && ent[k] !== null && ent[k] !== undefined) fields.push(k);
    }
  }
  return fields;
}

function fmt(x) {
  return x === null || x === undefined ? "n/a" : Number(x).toFixed(3);
}

function barRow(label, value, scale, cls) {
  const tr = document.createElement("tr");
  tr.className = cls || "term";
  const frac = scale > 0 ? Math.min(Math.abs(value) / scale, 1) : 0;
  const side = value < 0 ? "neg" : "pos";
  tr.innerHTML = `<th></th><td class="track"><div class="zero"></div><div class="bar ${side}"></div></td><td class="num"></td>`;
  tr.querySelector("th").textContent = label;
  const bar = tr.querySelector(".bar");
  bar.style.width = `${(frac * 50).toFixed(1)}%`;
  if (value < 0) bar.style.right = "50%"; else bar.style.left = "50%";
  tr.querySelector(".num").textContent = fmt(value);
  tr.dataset.term = label;
  return tr;
}

async function render(result) {
  $("#result").hidden = false;
  const verdict = $("#verdict");
  verdict.textContent = result.nil ? "NIL: probably not in this knowledge graph" : "Linked";
  verdict.className = `verdict ${result.nil ? "nil" : "linked"}`;
  const conf = result.confidence;
  $("#confidence").textContent = conf === null || conf === undefined ? "n/a" : `${(100 * conf).toFixed(1)} %`;
  const total = result.timings_ms && result.timings_ms.total;
  $("#meta").textContent = `index ${result.index_version} · model ${result.model_version}` +
    (total !== undefined ? ` · ${total.toFixed(0)} ms` : "");

  const list = $("#entities");
  list.innerHTML = "";
  state.blobs.forEach((u) => URL.revokeObjectURL(u));
  state.blobs = [];
  const ents = result.entities || [];
  const fields = termFields(ents);
  const scale = {};
  for (const f of [...fields, "score"]) scale[f] = Math.max(...ents.map((x) => Math.abs(x[f] || 0)), 1e-9);
  const explained = {};
  for (const a of result.explain || []) explained[a.id] = a;

  ents.forEach((ent, i) => {
    const li = $("#entity-tpl").content.firstElementChild.cloneNode(true);
    li.dataset.id = ent.id;
    $(".rank", li).textContent = `${i + 1}.`;
    $(".name", li).textContent = ent.name;
    const idLink = $(".id", li);
    idLink.textContent = ent.id;
    idLink.href = api(`v1/entities/${encodeURIComponent(ent.id)}`);
    const table = $(".terms", li);
    for (const f of fields) table.appendChild(barRow(TERM_LABELS[f] || f, ent[f], scale[f]));
    table.appendChild(barRow("final score", ent.score, scale.score, "final"));
    list.appendChild(li);
    loadEntity(li, ent.id);
    if (explained[ent.id]) drawAlignment(li, explained[ent.id]);
  });
  if (!ents.length) list.innerHTML = "<li class=\"muted\">No entity found.</li>";
}

async function loadEntity(li, id) {
  try {
    const meta = await (await apiFetch(`v1/entities/${encodeURIComponent(id)}`)).json();
    $(".description", li).textContent = meta.description || "(no description)";
    if (meta.has_image) {
      const blob = await (await apiFetch(`v1/entities/${encodeURIComponent(id)}/image`)).blob();
      const img = $(".kg-image", li);
      img.src = URL.createObjectURL(blob);
      state.blobs.push(img.src);
      img.alt = `KG image of ${meta.name}`;
      img.hidden = false;
      $(".no-image", li).hidden = true;
      li.dataset.kgImage = img.src;
      li.dispatchEvent(new Event("kg-image"));
    }
  } catch (err) {
    $(".description", li).textContent = err.message;
  }
}

// ------------------------------------------------------------------ alignment pictures

function heat(v) { // 0..1 -> white..deep blue
  const t = Math.max(0, Math.min(1, v));
  const r = Math.round(255 - 215 * t), g = Math.round(255 - 170 * t), b = Math.round(255 - 60 * t);
  return `rgb(${r},${g},${b})`;
}

function drawHeatmap(canvas, text) {
  const cell = 16;
  const ctx = canvas.getContext("2d");
  ctx.font = "12px system-ui, sans-serif";
  const rowW = Math.max(...text.mention_tokens.map((t) => ctx.measureText(t).width), 20) + 10;
  const colH = Math.max(...text.entity_tokens.map((t) => ctx.measureText(t).width), 20) + 10;
  const n = text.mention_tokens.length, m = text.entity_tokens.length;
  const dpr = window.devicePixelRatio || 1;
  const w = rowW + m * cell + 2, h = colH + n * cell + 2;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  canvas.style.width = `${w}px`;
  canvas.style.height = `${h}px`;
  ctx.scale(dpr, dpr);
  ctx.font = "12px system-ui, sans-serif";
  let max = 0;
  for (const row of text.plan) for (const v of row) max = Math.max(max, v);
  ctx.textBaseline = "middle";
  text.mention_tokens.forEach((tok, i) => {
    ctx.fillStyle = i < text.mention_first ? "#b03000" : "#333";
    ctx.textAlign = "right";
    ctx.fillText(tok, rowW - 6, colH + i * cell + cell / 2);
  });
  text.entity_tokens.forEach((tok, j) => {
    ctx.save();
    ctx.translate(rowW + j * cell + cell / 2, colH - 6);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillStyle = j < text.entity_first ? "#b03000" : "#333";
    ctx.fillText(tok, 0, 0);
    ctx.restore();
  });
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < m; j++) {
      ctx.fillStyle = heat(max > 0 ? text.plan[i][j] / max : 0);
      ctx.fillRect(rowW + j * cell, colH + i * cell, cell - 1, cell - 1);
    }
  }
  canvas.dataset.cells = String(n * m);
  canvas.title = "transport plan: mention tokens (rows) against entity tokens (columns)";
}

function patchShades(plan, byRow) { // per patch: the share of its mass on its single best partner
  const out = [];
  const n = plan.length, m = plan[0].length;
  const count = byRow ? n : m;
  for (let a = 0; a < count; a++) {
    let sum = 0, best = 0;
    const len = byRow ? m : n;
    for (let b = 0; b < len; b++) {
      const v = byRow ? plan[a][b] : plan[b][a];
      sum += v;
      best = Math.max(best, v);
    }
    out.push(sum > 0 ? best / sum : 0);
  }
  const hi = Math.max(...out), lo = Math.min(...out);
  return out.map((v) => (hi > lo ? (v - lo) / (hi - lo) : 0));
}

function drawPatches(canvas, src, grid, shades) {
  const ctx = canvas.getContext("2d");
  const [rows, cols] = grid;
  const paint = (img) => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (img) ctx.drawImage(img, 0, 0, canvas.width, canvas.height); // the encoder squashes to a square too
    else { ctx.fillStyle = "#ddd"; ctx.fillRect(0, 0, canvas.width, canvas.height); }
    const pw = canvas.width / cols, ph = canvas.height / rows;
    for (let p = 0; p < rows * cols; p++) {
      const r = Math.floor(p / cols), c = p % cols;
      ctx.fillStyle = `rgba(0,0,0,${(0.6 * (1 - shades[p])).toFixed(3)})`; // dark where little mass is concentrated
      ctx.fillRect(c * pw, r * ph, pw, ph);
      ctx.strokeStyle = "rgba(255,255,255,0.35)";
      ctx.strokeRect(c * pw, r * ph, pw, ph);
    }
  };
  if (!src) { paint(null); return; }
  if (canvas._img && canvas._img.src === src && canvas._img.complete) { paint(canvas._img); return; }
  const img = new Image();
  img.onload = () => paint(img);
  img.src = src;
  canvas._img = img;
}

function patchAt(canvas, e, grid) {
  const rect = canvas.getBoundingClientRect();
  const c = Math.floor(((e.clientX - rect.left) / rect.width) * grid[1]);
  const r = Math.floor(((e.clientY - rect.top) / rect.height) * grid[0]);
  return Math.max(0, Math.min(grid[0] * grid[1] - 1, r * grid[1] + c));
}

function norm(values) {
  const hi = Math.max(...values);
  return values.map((v) => (hi > 0 ? v / hi : 0));
}

function drawAlignment(li, a) {
  const box = $(".alignment", li);
  box.hidden = false;
  if (a.text) drawHeatmap($(".heatmap", li), a.text);
  else $(".heatmap-box", li).textContent = "No transport plan: the OT solve was skipped for this mention " +
    "(adaptive rerank, EL_RERANK__SKIP_MARGIN), so its OT term is 0.";
  if (!a.image || !state.imageUrl) return;
  const patches = $(".patches", li);
  patches.hidden = false;
  const cm = $(".patch-mention", li), ce = $(".patch-entity", li);
  const plan = a.image.plan, grid = a.image.grid;
  const mShade = patchShades(plan, true), eShade = patchShades(plan, false);
  const mentionSrc = state.imageUrl;
  const entitySrc = () => (a.image.entity_has_image ? li.dataset.kgImage || null : null);
  if (!a.image.entity_has_image) $(".entity-caption", li).textContent = "entity: no KG image (blank image's patches)";
  const reset = () => {
    drawPatches(cm, mentionSrc, grid, mShade);
    drawPatches(ce, entitySrc(), grid, eShade);
  };
  reset();
  li.addEventListener("kg-image", reset);
  cm.addEventListener("mousemove", (e) => {
    const p = patchAt(cm, e, grid);
    drawPatches(ce, entitySrc(), grid, norm(plan[p]));
    drawPatches(cm, mentionSrc, grid, mShade.map((_, i) => (i === p ? 1 : 0.15)));
  });
  ce.addEventListener("mousemove", (e) => {
    const p = patchAt(ce, e, grid);
    drawPatches(cm, mentionSrc, grid, norm(plan.map((row) => row[p])));
    drawPatches(ce, entitySrc(), grid, eShade.map((_, i) => (i === p ? 1 : 0.15)));
  });
  cm.addEventListener("mouseleave", reset);
  ce.addEventListener("mouseleave", reset);
}

// ------------------------------------------------------------------ start

window.addEventListener("DOMContentLoaded", () => {
  const keyInput = $("#api-key");
  keyInput.value = sessionStorage.getItem("el-api-key") || "";
  keyInput.addEventListener("change", () => sessionStorage.setItem("el-api-key", keyInput.value.trim()));
  const ta = $("#sentence");
  ["select", "mouseup", "keyup"].forEach((t) => ta.addEventListener(t, markMentionFromSelection));
  setupDrop();
  $("#link-form").addEventListener("submit", onSubmit);
  checkStatus();
});
