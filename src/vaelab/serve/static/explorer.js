// The latent explorer: plain JavaScript against the `vaelab serve` API (docs/serve.md). No framework, no CDN.
//
// window.explorer.state is the page's state, read by the browser tests:
//   z          the latent point asked for last (flat list of latent_dim numbers)
//   shownZ     the latent point of the image on the decoded canvas (equal to z once the decode caught up)
//   pointer    {u, v}: canvas pixel of the last map click or drag, from which z was projected
//   view       {cx, cy, span, size}: map pixel (u, v) <-> projected point (cx + (u/size - 1/2) span,
//              cy - (v/size - 1/2) span); latent = mean + x components[0] + y components[1]
//   perf       first paint of the map and pointer-to-pixels decode latencies (performance.now(), ms)
// The decoded canvas (#decoded) shows pixel (i, j) of channel c as round(255 clamp(x, 0, 1)) in a block of
// scale x scale canvas pixels; its data-z attribute holds shownZ as JSON.
"use strict";

(function () {
  const TOKEN = new URLSearchParams(location.search).get("token");
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"];
  const $ = (id) => document.getElementById(id);

  const state = {
    info: null, map: null, z: null, shownZ: null, pointer: null, view: null, label: null, scale: 1,
    ends: [], strip: null, kl: null, busy: false, ready: false,
    perf: { start: performance.now(), mapLoaded: null, firstPaint: null, decodes: [] },
  };

  // ------------------------------------------------------------------------------------------- the API
  function withToken(path) {
    return TOKEN ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : path;
  }

  async function api(path, body) {
    const init = { headers: {} };
    if (TOKEN) init.headers["Authorization"] = "Bearer " + TOKEN;
    if (body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { message = (await r.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(path + ": " + message);
    }
    return r.json();
  }

  function showError(e) {
    $("error").textContent = String(e.message || e);
    console.error(e);
  }

  // ------------------------------------------------------------------------------------- latent algebra
  // the flat latent of a map point: mean + x components[0] + y components[1]
  function project(x, y) {
    const p = state.map.projection;
    return p.mean.map((m, d) => m + x * p.components[0][d] + (p.components.length > 1 ? y * p.components[1][d] : 0));
  }

  // the map point of a flat latent (its coordinates along the components: they are orthonormal)
  function unproject(z) {
    const p = state.map.projection;
    const dot = (c) => c.reduce((s, cd, d) => s + cd * (z[d] - p.mean[d]), 0);
    return [dot(p.components[0]), p.components.length > 1 ? dot(p.components[1]) : 0];
  }

  // a flat list as a nested array of the given shape
  function nest(flat, shape) {
    if (shape.length <= 1) return flat.slice();
    const step = shape.slice(1).reduce((a, b) => a * b, 1);
    const out = [];
    for (let i = 0; i < shape[0]; i++) out.push(nest(flat.slice(i * step, (i + 1) * step), shape.slice(1)));
    return out;
  }

  const flatten = (a) => (Array.isArray(a) ? a.flat(Infinity) : [a]);

  function labelBody() {
    return state.info.capabilities.conditional ? { label: state.label } : {};
  }

  // --------------------------------------------------------------------------------------- drawing images
  // one decoded sample (C,H,W nested, data space) onto a canvas at an integer scale, nearest neighbour
  function drawImage(canvas, x, scale) {
    const shape = state.info.input_shape;
    const [C, H, W] = shape;
    const flat = flatten(x);
    canvas.width = W * scale;
    canvas.height = H * scale;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(W * scale, H * scale);
    const q = (v) => Math.round(255 * Math.min(1, Math.max(0, v)));
    for (let i = 0; i < H; i++) {
      for (let j = 0; j < W; j++) {
        const at = (c) => flat[c * H * W + i * W + j];
        const rgb = C === 3 ? [q(at(0)), q(at(1)), q(at(2))] : [q(at(0)), q(at(0)), q(at(0))];
        for (let a = 0; a < scale; a++) {
          for (let b = 0; b < scale; b++) {
            const k = 4 * ((i * scale + a) * W * scale + j * scale + b);
            img.data[k] = rgb[0]; img.data[k + 1] = rgb[1]; img.data[k + 2] = rgb[2]; img.data[k + 3] = 255;
          }
        }
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  // ------------------------------------------------------------------------------------------ the map
  let base = null; // the points, drawn once (an offscreen canvas); markers are drawn over a copy of it

  function setupView() {
    const pts = state.map.points;
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const [x, y] of pts) {
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    if (!pts.length) { x0 = y0 = -3; x1 = y1 = 3; }
    if (state.info.capabilities.stochastic) { // at least two prior standard deviations: collapsed codes leave room
      x0 = Math.min(x0, -2); y0 = Math.min(y0, -2); x1 = Math.max(x1, 2); y1 = Math.max(y1, 2);
    }
    const span = Math.max(x1 - x0, y1 - y0, 1e-6) * 1.12; // same scale on both axes: distances stay true
    state.view = { cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, span: span, size: $("map").width };
  }

  function toCanvas(x, y) {
    const v = state.view;
    return [((x - v.cx) / v.span + 0.5) * v.size, (0.5 - (y - v.cy) / v.span) * v.size];
  }

  function fromCanvas(u, w) {
    const v = state.view;
    return [v.cx + (u / v.size - 0.5) * v.span, v.cy - (w / v.size - 0.5) * v.span];
  }

  function drawBase() {
    const canvas = $("map");
    base = document.createElement("canvas");
    base.width = canvas.width; base.height = canvas.height;
    const ctx = base.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, base.width, base.height);
    // the axes through the origin of the projected plane
    ctx.strokeStyle = "#ddd";
    ctx.lineWidth = 1;
    const [ou, ov] = toCanvas(0, 0);
    ctx.beginPath();
    ctx.moveTo(0, ov); ctx.lineTo(base.width, ov); ctx.moveTo(ou, 0); ctx.lineTo(ou, base.height);
    ctx.stroke();
    const labels = state.map.labels;
    const pts = state.map.points;
    const r = pts.length > 3000 ? 1.5 : 2.5;
    ctx.globalAlpha = pts.length > 3000 ? 0.6 : 0.8;
    for (let i = 0; i < pts.length; i++) {
      const [u, v] = toCanvas(pts[i][0], pts[i][1]);
      ctx.fillStyle = labels ? PALETTE[((labels[i] % 10) + 10) % 10] : "#1f77b4";
      ctx.fillRect(u - r, v - r, 2 * r, 2 * r);
    }
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#666";
    ctx.font = "11px sans-serif";
    const kind = state.map.projection.kind;
    ctx.fillText(kind === "pca" ? "PC 1 →" : "z[0] →", base.width - 52, base.height - 6);
    ctx.fillText(kind === "pca" ? "↑ PC 2" : "↑ z[1]", 4, 12);
  }

  // a cross at a latent point
  function marker(ctx, z, colour, text) {
    const [x, y] = unproject(z);
    const [u, v] = toCanvas(x, y);
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(u - 7, v); ctx.lineTo(u + 7, v); ctx.moveTo(u, v - 7); ctx.lineTo(u, v + 7);
    ctx.stroke();
    if (text) { ctx.fillStyle = colour; ctx.font = "bold 12px sans-serif"; ctx.fillText(text, u + 6, v - 6); }
  }

  function drawMap() {
    const ctx = $("map").getContext("2d");
    ctx.drawImage(base, 0, 0);
    if (state.ends.length === 2) { // the interpolation's line in the plane
      const [a, b] = state.ends.map((e) => toCanvas(...unproject(e.z)));
      ctx.strokeStyle = "rgba(0,0,0,0.5)"; ctx.setLineDash([4, 3]); ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke(); ctx.setLineDash([]);
    }
    state.ends.forEach((e, k) => marker(ctx, e.z, "#444", k ? "B" : "A"));
    if (state.z) marker(ctx, state.z, "#000", "");
  }

  // the test point nearest to canvas pixel (u, v) within `radius` pixels, or -1
  function nearest(u, v, radius) {
    const pts = state.map.points;
    let best = -1, bestD = radius * radius;
    for (let i = 0; i < pts.length; i++) {
      const [pu, pv] = toCanvas(pts[i][0], pts[i][1]);
      const d = (pu - u) * (pu - u) + (pv - v) * (pv - v);
      if (d <= bestD) { bestD = d; best = i; }
    }
    return best;
  }

  function canvasPoint(e) {
    const canvas = $("map");
    const rect = canvas.getBoundingClientRect();
    return [(e.clientX - rect.left) * canvas.width / rect.width, (e.clientY - rect.top) * canvas.height / rect.height];
  }

  // --------------------------------------------------------------------------------- live decoding
  // One request in flight; while it runs, the latest asked point waits (older ones are dropped).
  let pending = null;

  function requestDecode(z, t0) {
    pending = { z: z.slice(), label: state.label, t0: t0 === undefined ? performance.now() : t0 };
    if (!state.busy) pump();
  }

  async function pump() {
    state.busy = true;
    while (pending) {
      const job = pending;
      pending = null;
      try {
        const body = Object.assign({ z: [nest(job.z, state.info.latent_shape)], format: "array" },
                                   state.info.capabilities.conditional ? { label: job.label } : {});
        const out = await api("api/decode", body);
        showDecoded(out.x[0], job.z);
        state.perf.decodes.push(performance.now() - job.t0);
      } catch (e) { showError(e); }
    }
    state.busy = false;
  }

  function showDecoded(x, z) {
    const canvas = $("decoded");
    if (state.info.image) {
      drawImage(canvas, x, state.scale);
    } else {
      drawBars(canvas, flatten(x));
    }
    state.shownZ = z.slice();
    canvas.dataset.z = JSON.stringify(state.shownZ);
    canvas.dataset.label = state.label === null ? "" : String(state.label);
  }

  function drawBars(canvas, values) { // a tabular row: one bar per column
    canvas.width = 196; canvas.height = 120;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    const lo = Math.min(0, ...values), hi = Math.max(0, ...values), w = canvas.width / values.length;
    const y = (v) => canvas.height - ((v - lo) / (hi - lo || 1)) * canvas.height;
    ctx.fillStyle = "#1f77b4";
    values.forEach((v, i) => ctx.fillRect(i * w, Math.min(y(v), y(0)), Math.max(1, w - 1), Math.abs(y(v) - y(0))));
  }

  function setZ(z, t0) {
    state.z = z;
    $("z-text").textContent = "z = [" + z.slice(0, 32).map((v) => v.toFixed(3)).join(", ") +
      (z.length > 32 ? ", … (" + z.length + " numbers)" : "") + "]";
    updateSliders();
    drawMap();
    requestDecode(z, t0);
  }

  // ----------------------------------------------------------------------------------- interpolation
  async function interpolate() {
    if (state.ends.length !== 2) return;
    if ($("steps").value.trim() === "") return; // being typed
    const steps = Number($("steps").value);
    if (!(Number.isInteger(steps) && steps >= 2)) {
      showError(new Error("steps must be an integer of at least 2, got " + $("steps").value));
      return;
    }
    const [a, b] = state.ends;
    const body = (a.index !== null && b.index !== null)
      ? { index0: a.index, index1: b.index, steps: steps }
      : { z0: nest(a.z, state.info.latent_shape), z1: nest(b.z, state.info.latent_shape), steps: steps };
    Object.assign(body, labelBody());
    try {
      const out = await api("api/interpolate", body);
      const strip = $("strip");
      strip.textContent = "";
      // frames of at most 56 pixels that fit the panel side by side
      const side = Math.min(56, Math.floor(($("strip").clientWidth || 460) / steps) - 4);
      const scale = Math.max(1, Math.floor(side / Math.max(state.info.input_shape[1], state.info.input_shape[2])));
      out.x.forEach((x, k) => {
        const c = document.createElement("canvas");
        c.className = "frame";
        if (state.info.image) drawImage(c, x, scale); else drawBars(c, flatten(x));
        c.dataset.z = JSON.stringify(flatten(out.z[k]));
        c.title = "step " + (k + 1) + " of " + out.x.length;
        strip.appendChild(c);
      });
      state.strip = { frames: out.x.length, steps: steps, z: out.z.map(flatten), scale: scale, body: body };
      $("error").textContent = "";
    } catch (e) { showError(e); }
  }

  function describeEnd(e, k) {
    return (k ? "B" : "A") + (e.index !== null ? " = test image #" + e.index : " = point");
  }

  function addEnd(u, v) {
    const i = nearest(u, v, 5);
    // a test image's own code when the click is on its point (its full code: the server encodes it)
    const end = i >= 0
      ? { index: state.map.indices[i], z: project(...state.map.points[i]) }
      : { index: null, z: project(...fromCanvas(u, v)) };
    state.ends = state.ends.length >= 2 ? [end] : state.ends.concat([end]);
    $("ends").textContent = state.ends.map(describeEnd).join(", ");
    drawMap();
    interpolate();
  }

  // --------------------------------------------------------------------------------------- sliders
  const SLIDER_RANGE = 3; // prior standard deviations either side
  const MAX_SLIDERS = 32;

  function buildSliders() {
    const box = $("sliders");
    box.textContent = "";
    const dims = state.kl ? state.kl.dims : [...Array(state.info.latent_dim).keys()];
    state.traverseDim = dims.length <= MAX_SLIDERS || state.kl ? dims[0] : null;
    if (!state.kl && dims.length > MAX_SLIDERS) {
      box.textContent = state.info.latent_dim + " latent numbers and no KL order (a deterministic code): no sliders";
      return;
    }
    $("sliders-order").textContent = state.kl ? "(sorted by KL)"
      : state.info.capabilities.stochastic ? "(in order: the KL needs the test split)" : "(in order: a deterministic code has no KL)";
    dims.forEach((d, k) => {
      const row = document.createElement("label");
      row.className = "slider";
      const name = document.createElement("span");
      name.textContent = "z[" + d + "]" + (state.kl ? " KL " + state.kl.kl[k].toFixed(2) : "");
      const input = document.createElement("input");
      input.type = "range"; input.min = -SLIDER_RANGE; input.max = SLIDER_RANGE; input.step = 0.01;
      input.dataset.dim = d;
      input.addEventListener("input", () => {
        if (!state.z) return;
        const z = state.z.slice();
        z[d] = parseFloat(input.value);
        setZ(z);
      });
      input.addEventListener("change", () => { state.traverseDim = d; traverse(); });
      const value = document.createElement("output");
      row.append(name, input, value);
      box.appendChild(row);
    });
  }

  // The traversal strip: the current point with one dimension (the slider touched last, at first the most
  // informative) set to TRAVERSE_VALUES in turn (/api/traverse). Asked when a drag or a slider move ends, not
  // on every pointer move: the live image has the model first.
  const TRAVERSE_VALUES = [-3, -2.25, -1.5, -0.75, 0, 0.75, 1.5, 2.25, 3];
  let traverseSeq = 0;

  async function traverse() {
    if (!state.z || state.traverseDim === null || state.traverseDim === undefined) return;
    const seq = ++traverseSeq, dim = state.traverseDim;
    const body = Object.assign({ z: nest(state.z, state.info.latent_shape), dim: dim, values: TRAVERSE_VALUES },
                               labelBody());
    try {
      const out = await api("api/traverse", body);
      if (seq !== traverseSeq) return; // a newer one was asked meanwhile
      const strip = $("traverse-strip");
      strip.textContent = "";
      const side = Math.min(48, Math.floor((strip.clientWidth || 460) / TRAVERSE_VALUES.length) - 4);
      const scale = Math.max(1, Math.floor(side / Math.max(state.info.input_shape[1], state.info.input_shape[2])));
      out.x.forEach((x, k) => {
        const c = document.createElement("canvas");
        c.className = "frame";
        if (state.info.image) drawImage(c, x, scale); else drawBars(c, flatten(x));
        c.title = "z[" + dim + "] = " + TRAVERSE_VALUES[k];
        strip.appendChild(c);
      });
      $("traverse-caption").textContent = "traversal of z[" + dim + "] from " + TRAVERSE_VALUES[0] + " to " +
        TRAVERSE_VALUES[TRAVERSE_VALUES.length - 1] + " around the current point";
      state.traversal = { dim: dim, z: out.z.map(flatten), frames: out.x.length, label: state.label };
    } catch (e) { showError(e); }
  }

  function updateSliders() {
    for (const input of $("sliders").querySelectorAll("input")) {
      const v = state.z[+input.dataset.dim];
      if (Math.abs(v) > SLIDER_RANGE) { input.min = -Math.ceil(Math.abs(v)); input.max = Math.ceil(Math.abs(v)); }
      input.value = v;
      input.nextElementSibling.textContent = v.toFixed(2);
    }
  }

  // ----------------------------------------------------------------------------------- the run's record
  function drawCurves(rows, key) {
    const canvas = $("curves");
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, L = 48, R = 10, T = 10, B = 24;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    const series = [key, key.startsWith("train_") ? "val_" + key.slice(6) : null]
      .filter((k) => k && rows.some((r) => typeof r[k] === "number"));
    const pts = series.map((k) => rows.filter((r) => typeof r[k] === "number").map((r, i) => [r.epoch ?? i + 1, r[k]]));
    const all = pts.flat();
    if (!all.length) return;
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const X = (x) => L + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - L - R);
    const Y = (y) => T + (y1 > y0 ? (y1 - y) / (y1 - y0) : 0.5) * (H - T - B);
    ctx.strokeStyle = "#999"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B); ctx.stroke();
    ctx.fillStyle = "#444"; ctx.font = "11px sans-serif";
    ctx.fillText(y1.toPrecision(4), 2, T + 8); ctx.fillText(y0.toPrecision(4), 2, H - B);
    ctx.fillText("epoch " + x0, L, H - 6); ctx.fillText("epoch " + x1, W - R - 50, H - 6);
    pts.forEach((p, s) => {
      ctx.strokeStyle = PALETTE[s]; ctx.fillStyle = PALETTE[s]; ctx.lineWidth = 2;
      ctx.beginPath();
      p.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
      ctx.stroke();
      p.forEach(([x, y]) => ctx.fillRect(X(x) - 2, Y(y) - 2, 4, 4));
      ctx.fillText(series[s], W - R - 110, T + 12 + 14 * s);
    });
  }

  async function loadRecord() {
    try {
      const rows = (await api("api/metrics")).rows;
      const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))]
        .filter((k) => k !== "epoch" && k !== "step" && !k.startsWith("val_") && rows.some((r) => typeof r[k] === "number"));
      const select = $("metric");
      select.textContent = "";
      for (const k of keys) select.add(new Option(k, k));
      if (keys.includes("train_loss")) select.value = "train_loss";
      select.addEventListener("change", () => drawCurves(rows, select.value));
      if (keys.length) drawCurves(rows, select.value);
    } catch (e) { showError(e); }
    try {
      const names = (await api("api/pictures")).pictures;
      const box = $("pictures");
      for (const name of names) {
        const fig = document.createElement("figure");
        const img = document.createElement("img");
        img.src = withToken("api/pictures/" + encodeURIComponent(name));
        img.alt = name;
        const link = document.createElement("a"); // full size in a tab of its own
        link.href = img.src;
        link.target = "_blank";
        link.appendChild(img);
        const cap = document.createElement("figcaption");
        cap.textContent = name;
        fig.append(link, cap);
        box.appendChild(fig);
      }
    } catch (e) { showError(e); }
  }

  // ------------------------------------------------------------------------------ VQ-VAE code painting
  // The code grid of a test image (its PNG, encoded by the server), one cell per code: painting a cell
  // decodes the edited grid (/api/decode-codes) with the same one-in-flight rule as the map.
  let CELL = 32; // the grid's cell in canvas pixels: setupCodes makes the grid about 224 pixels wide
  const codeColour = (k) => "hsl(" + ((k * 137.508) % 360).toFixed(1) + ", 65%, " + (k % 2 ? 62 : 48) + "%)";

  async function loadCodes(row) {
    try {
      const blob = await (await fetch(withToken("api/test-image/" + row),
                                      TOKEN ? { headers: { Authorization: "Bearer " + TOKEN } } : {})).blob();
      const b64 = await new Promise((resolve) => {
        const reader = new FileReader();
        reader.onload = () => resolve(String(reader.result).split(",")[1]);
        reader.readAsDataURL(blob);
      });
      const out = await api("api/encode", { png: [b64] });
      state.codes = out.indices[0];
      state.codesRow = row;
      drawCodes();
      requestCodes();
    } catch (e) { showError(e); }
  }

  function drawCodes() {
    const [h, w] = state.info.code_grid, canvas = $("code-grid"), ctx = canvas.getContext("2d");
    canvas.width = w * CELL; canvas.height = h * CELL;
    ctx.font = "11px sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        const k = state.codes[i][j];
        ctx.fillStyle = codeColour(k);
        ctx.fillRect(j * CELL, i * CELL, CELL - 1, CELL - 1);
        ctx.fillStyle = "#000";
        ctx.fillText(String(k), j * CELL + CELL / 2, i * CELL + CELL / 2);
      }
    }
  }

  let codesPending = null, codesBusy = false;

  function requestCodes() {
    codesPending = JSON.parse(JSON.stringify(state.codes));
    if (!codesBusy) pumpCodes();
  }

  async function pumpCodes() {
    codesBusy = true;
    state.codesBusy = true;
    while (codesPending) {
      const grid = codesPending;
      codesPending = null;
      try {
        const out = await api("api/decode-codes", { indices: [grid], format: "array" });
        const canvas = $("code-decoded");
        drawImage(canvas, out.x[0], state.scale);
        state.codesShown = grid;
        canvas.dataset.codes = JSON.stringify(grid);
      } catch (e) { showError(e); }
    }
    codesBusy = false;
    state.codesBusy = false;
  }

  function setupCodes() {
    if (!state.info.capabilities.discrete || !state.info.code_grid || !state.info.image) return;
    const K = state.info.codebook_size;
    CELL = Math.max(20, Math.min(64, Math.floor(224 / Math.max(...state.info.code_grid))));
    $("paint-code").max = K - 1;
    $("code-row").max = (state.info.test_size || 1) - 1;
    if (K <= 64) { // a swatch per code
      for (let k = 0; k < K; k++) {
        const b = document.createElement("button");
        b.type = "button"; b.className = "swatch"; b.textContent = k; b.style.background = codeColour(k);
        b.addEventListener("click", () => { $("paint-code").value = k; });
        $("swatches").appendChild(b);
      }
    }
    const grid = $("code-grid");
    let painting = false;
    const cell = (e) => {
      const rect = grid.getBoundingClientRect();
      const j = Math.floor((e.clientX - rect.left) * grid.width / rect.width / CELL);
      const i = Math.floor((e.clientY - rect.top) * grid.height / rect.height / CELL);
      const [h, w] = state.info.code_grid;
      return i >= 0 && i < h && j >= 0 && j < w ? [i, j] : null;
    };
    const paint = (e) => {
      const at = cell(e);
      if (!at || !state.codes) return;
      const k = parseInt($("paint-code").value, 10);
      if (!(k >= 0 && k < K)) { showError(new Error("paint code must be in 0.." + (K - 1) + ", got " + $("paint-code").value)); return; }
      if (state.codes[at[0]][at[1]] === k) return;
      state.codes[at[0]][at[1]] = k;
      drawCodes();
      requestCodes();
    };
    grid.addEventListener("pointerdown", (e) => {
      if (e.altKey) { const at = cell(e); if (at) $("paint-code").value = state.codes[at[0]][at[1]]; return; }
      painting = true;
      grid.setPointerCapture(e.pointerId);
      paint(e);
    });
    grid.addEventListener("pointermove", (e) => { if (painting) paint(e); });
    grid.addEventListener("pointerup", () => { painting = false; });
    $("code-load").addEventListener("click", () => loadCodes(parseInt($("code-row").value, 10)));
    $("codes-panel").hidden = false;
    loadCodes(0);
  }

  // ------------------------------------------------------------------------------------ anomaly scores
  // The test split's scores as a histogram; the threshold slider is a quantile (0.1% steps) of them, and
  // the rows at or above it are flagged, the highest shown as thumbnails.
  const TOP = 12;

  async function loadScores(kind) {
    try {
      const out = await api("api/scores?kind=" + encodeURIComponent(kind));
      const sorted = out.score.slice().sort((a, b) => a - b);
      state.scores = { kind: out.kind, score: out.score, sorted: sorted, threshold: null, flagged: 0, top: [] };
      updateThreshold();
    } catch (e) { showError(e); }
  }

  function updateThreshold() {
    const sc = state.scores;
    if (!sc || !sc.score.length) return;
    const n = sc.sorted.length, p = parseInt($("threshold").value, 10) / 1000;
    sc.threshold = sc.sorted[Math.min(n - 1, Math.floor(p * n))];
    const flagged = sc.score.map((v, i) => [v, i]).filter(([v]) => v >= sc.threshold).sort((a, b) => b[0] - a[0]);
    sc.flagged = flagged.length;
    sc.top = flagged.slice(0, TOP).map(([, i]) => i);
    $("threshold-text").textContent = sc.threshold.toPrecision(4) + " (" + (100 * p).toFixed(1) +
      "th percentile): " + sc.flagged + " of " + n + " flagged";
    drawHistogram();
    const box = $("anomalies");
    box.textContent = "";
    for (const [v, i] of flagged.slice(0, TOP)) {
      const fig = document.createElement("figure");
      if (state.info.image) {
        const img = document.createElement("img");
        img.src = withToken("api/test-image/" + i);
        img.alt = "test #" + i;
        fig.appendChild(img);
      }
      const cap = document.createElement("figcaption");
      cap.textContent = "#" + i + " · " + v.toPrecision(4);
      fig.appendChild(cap);
      box.appendChild(fig);
    }
  }

  function drawHistogram() {
    const sc = state.scores, canvas = $("histogram"), ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, B = 18, BINS = 40;
    const lo = sc.sorted[0], hi = sc.sorted[sc.sorted.length - 1], width = (hi - lo) / BINS || 1;
    const counts = new Array(BINS).fill(0);
    for (const v of sc.score) counts[Math.min(BINS - 1, Math.floor((v - lo) / width))]++;
    const top = Math.max(...counts);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    const bw = W / BINS;
    counts.forEach((c, b) => {
      ctx.fillStyle = lo + (b + 1) * width > sc.threshold ? "#d62728" : "#90a4ae";
      const h = (c / top) * (H - B - 6);
      ctx.fillRect(b * bw + 1, H - B - h, bw - 2, h);
    });
    const x = ((sc.threshold - lo) / (hi - lo || 1)) * W;
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, H - B); ctx.stroke();
    ctx.fillStyle = "#444"; ctx.font = "11px sans-serif";
    ctx.fillText(lo.toPrecision(4), 2, H - 4);
    const right = hi.toPrecision(4);
    ctx.fillText(right, W - ctx.measureText(right).width - 2, H - 4);
  }

  function setupScores() {
    const kinds = state.info.score_kinds || [];
    if (!kinds.length) return;
    const select = $("score-kind");
    for (const k of kinds) select.add(new Option(k, k));
    select.value = state.info.default_score || kinds[0];
    select.addEventListener("change", () => loadScores(select.value));
    $("threshold").addEventListener("input", updateThreshold);
    $("scores-panel").hidden = false;
    $("scores-details").addEventListener("toggle", () => {
      if ($("scores-details").open && !state.scores) loadScores(select.value);
    });
  }

  // --------------------------------------------------------------------------------------- start-up
  function bindMap() {
    const canvas = $("map");
    let dragging = false;
    const at = (e) => {
      const [u, v] = canvasPoint(e);
      state.pointer = { u: u, v: v };
      setZ(project(...fromCanvas(u, v)), performance.now());
    };
    canvas.addEventListener("pointerdown", (e) => {
      if (e.shiftKey) { const [u, v] = canvasPoint(e); addEnd(u, v); return; }
      dragging = true;
      canvas.setPointerCapture(e.pointerId);
      at(e);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (dragging) { at(e); return; }
      hover(e);
    });
    const stop = () => { if (dragging) traverse(); dragging = false; };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    canvas.addEventListener("pointerleave", () => { $("tooltip").hidden = true; });
  }

  function hover(e) {
    const [u, v] = canvasPoint(e);
    const i = nearest(u, v, 5);
    const tip = $("tooltip");
    if (i < 0) { tip.hidden = true; return; }
    const row = state.map.indices[i];
    const thumb = $("thumb");
    const src = withToken("api/test-image/" + row);
    if (thumb.dataset.row !== String(row)) { thumb.src = src; thumb.dataset.row = row; }
    const lab = state.map.labels ? state.map.labels[i] : null;
    $("tip-text").textContent = "test #" + row + (lab === null ? "" : " · " + className(lab));
    tip.style.left = (u > $("map").width - 90 ? u - 80 : u + 12) + "px"; // inside the map near its right edge
    tip.style.top = (v + 12) + "px";
    tip.hidden = false;
  }

  function className(k) {
    const classes = state.info.classes;
    return classes && classes[k] !== undefined ? classes[k] : String(k);
  }

  function buildLegend() {
    const box = $("legend");
    box.textContent = "";
    if (!state.map.labels) return;
    const seen = [...new Set(state.map.labels)].sort((a, b) => a - b);
    for (const k of seen) {
      const item = document.createElement("span");
      item.className = "key";
      const sw = document.createElement("i");
      sw.style.background = PALETTE[((k % 10) + 10) % 10];
      item.append(sw, document.createTextNode(className(k)));
      box.appendChild(item);
    }
  }

  async function start() {
    try {
      const info = await api("api/info");
      state.info = info;
      $("run-info").textContent = info.run + " · " + info.model + " on " + info.dataset + " · latent " +
        info.latent_shape.join("×") + (info.epochs !== undefined ? " · " + info.epochs + (info.epochs === 1 ? " epoch" : " epochs") : "");
      if (info.image) {
        const [, H, W] = info.input_shape;
        state.scale = Math.max(1, Math.floor(196 / Math.max(H, W)));
      }
      if (info.capabilities.conditional) {
        const select = $("label");
        const n = info.num_classes || (info.classes || []).length;
        for (let k = 0; k < n; k++) select.add(new Option(className(k), String(k)));
        state.label = 0;
        $("label-box").hidden = false;
        select.addEventListener("change", () => {
          state.label = parseInt(select.value, 10);
          if (state.z) requestDecode(state.z);
          interpolate();
          traverse();
        });
      }
      let map;
      try {
        map = await api("api/latent-map?n=10000");
        $("map-caption").textContent = map.points.length + " test points · " +
          (map.projection.kind === "pca" ? "PCA of the " + info.latent_dim + "-d means" : "the latent means");
      } catch (e) { // no test split (the data moved): the map is the plane of the first two latent numbers
        showError(e);
        const D = info.latent_dim, unit = (k) => [...Array(D).keys()].map((d) => (d === k ? 1 : 0));
        map = { points: [], labels: null, indices: [],
                projection: { kind: "identity", mean: unit(-1), components: [unit(0), unit(1)] } };
        $("map-caption").textContent = "no test points: the plane of z[0] and z[1], the rest 0";
      }
      state.map = map;
      state.perf.mapLoaded = performance.now();
      setupView();
      drawBase();
      buildLegend();
      drawMap();
      state.perf.firstPaint = performance.now();
      bindMap();
      try { state.kl = await api("api/kl"); } catch (e) { state.kl = null; /* deterministic codes: no KL */ }
      buildSliders();
      $("steps").addEventListener("change", interpolate);
      $("clear-ends").addEventListener("click", () => {
        state.ends = []; state.strip = null; $("strip").textContent = "";
        $("ends").textContent = "shift-click two points on the map"; drawMap();
      });
      setZ(project(state.view.cx, state.view.cy)); // start at the map's centre
      traverse();
      state.ready = true;
      loadRecord();
      setupScores();
      setupCodes();
    } catch (e) { showError(e); }
  }

  window.explorer = { state: state, project: project, unproject: unproject, fromCanvas: fromCanvas,
                      toCanvas: toCanvas, setZ: setZ, interpolate: interpolate };
  start();
})();
