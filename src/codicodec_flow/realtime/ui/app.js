// codicodec-flow live: the browser control surface. Plain JS, nothing loaded from elsewhere.
// It speaks the realtime JSON protocol over the WebSocket at /ws of the page's own port: it builds its
// controls from the engine's reference ({"help": true}), follows the engine's state ({"get": "state"},
// asked again after each chunk) and draws the opt-in display events (waveform, latents).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const HOLD_MS = 1500;  // after a local edit, the engine's (older) value of that control is not shown for this long
  const SEND_MS = 60;  // at most one message per control this often while a slider moves
  const STEER_RANGE = {bias: [-2, 2], scale: [-1, 3]};  // what the channel bars show (the engine accepts -4..4)
  const NEUTRAL = {bias: 0, scale: 1};
  const PLACE = {crossfade_chunks: "seed-controls", auto_cycle: "seed-controls"};  // else the Sound panel

  const app = {
    ws: null, reference: null, state: null, edited: new Map(), outbox: new Map(), timer: null,
    asked: 0, waiting: false, mode: "bias", tokens: {}, channels: {}, lfoKey: "",
  };

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs = {}, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v === true) e.setAttribute(k, "");
      else if (v !== false && v != null) e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid != null) e.append(kid);
    return e;
  }

  const label = (name) => name.replace(/_/g, " ");
  const fmt = (v, digits = 2) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : String(v));
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const held = (name) => performance.now() - (app.edited.get(name) || -1e9) < HOLD_MS;
  const busy = (node) => node === document.activeElement || node.dataset.dragging === "1";

  function status(text, kind = "") {
    const s = $("status");
    s.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    s.className = `status ${kind}`;
  }

  function parse(line) {
    // seeds may exceed 2^53: keep long ones as strings, so they show (and can be copied) exactly
    return JSON.parse(line.replace(/"seed":(\d{16,})/g, '"seed":"$1"'));
  }

  // ------------------------------------------------------------------ connection

  function connect() {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
    app.ws = ws;
    setConn("connecting…", "");
    ws.onopen = () => {
      setConn("connected", "up");
      status("connected");
      app.waiting = false;
      send({help: true});
      send({get: "info"});
      send({get: "state"});
      if ($("display-events").checked) send({events: {waveform: true, latents: true}});
    };
    ws.onmessage = (m) => {
      for (const line of String(m.data).split("\n")) if (line.trim()) onEvent(parse(line));
    };
    ws.onclose = (e) => {
      setConn("disconnected, retrying", "down");
      status(`connection closed${e.reason ? ": " + e.reason : ""}; retrying in 2 s`, "warn");
      setTimeout(connect, 2000);
    };
  }

  function setConn(text, kind) {
    $("conn").textContent = text;
    $("conn").className = `conn ${kind}`;
  }

  function send(msg) {
    sendText(JSON.stringify(msg));
  }

  function sendText(text) {
    if (app.ws && app.ws.readyState === WebSocket.OPEN) app.ws.send(text);
  }

  setInterval(() => sendText(""), 60000);  // an empty message keeps an idle connection open

  function askState() {
    const now = performance.now();
    if (app.waiting && now - app.asked < 2000) return;
    if (now - app.asked < 250) return;
    app.asked = now;
    app.waiting = true;
    send({get: "state"});
  }

  // ------------------------------------------------------------------ events

  function onEvent(e) {
    switch (e.event) {
      case "help": build(e.reference); break;
      case "state": app.waiting = false; showState(e.state); break;
      case "ready": showInfo(e); break;
      case "chunk": showChunk(e); askState(); break;
      case "waveform": drawMeter(e); drawWave(e); break;
      case "latents": drawHeat(e.grid); break;
      case "seed": status(`auto-cycle: seed ${e.seed} from chunk ${e.index}`); break;
      case "recovered": status(`chunk ${e.index} ${e.outcome}: ${(e.reasons || []).join("; ")}`, "warn"); break;
      case "error": status(e.message, "error"); break;
      case "end": status(`the stream ended after ${e.chunks} chunks`, "warn"); break;
      default: break;  // "ok" and anything newer
    }
  }

  function showInfo(e) {
    const parts = [e.codec && `codec ${e.codec}`, e.window && `window ${e.window}`,
      e.checkpoint && `${e.checkpoint}${e.step != null ? ` (step ${e.step})` : ""}`];
    $("info").textContent = parts.filter(Boolean).join(" · ");
  }

  function showChunk(e) {
    $("stat-index").textContent = e.index;
    const rtf = $("stat-rtf");
    rtf.textContent = e.rtf == null ? "–" : `${e.rtf.toFixed(2)}×`;
    rtf.className = e.rtf != null && e.rtf < 1 ? "bad" : "";
    $("stat-compute").textContent = `${(e.compute_s * 1000).toFixed(0)} ms`;
    $("stat-buffer").textContent = `${e.buffer_s.toFixed(2)} s`;
    const under = $("stat-underruns");
    under.textContent = e.underruns;
    under.className = e.underruns > 0 ? "bad" : "";
  }

  // ------------------------------------------------------------------ building the controls

  function build(reference) {
    const first = app.reference === null;
    app.reference = reference;
    if (!first) return;  // a reconnect: the controls are there already
    for (const [name, spec] of Object.entries(reference.controls)) {
      if (spec.type === "vector" || name === "seed") continue;
      $(PLACE[name] || "controls").append(controlRow(name, spec));
    }
    buildSteering(reference);
    buildLfoForm(reference.lfo);
    const what = $("rand-what");
    for (const w of reference.randomise.what) what.append(el("option", {text: w}));
    what.value = "channels";
    if (app.state) showState(app.state);
  }

  function stepFor(spec) {
    if (spec.type === "integer") return 1;
    const span = spec.range[1] - spec.range[0];
    return Math.pow(10, Math.round(Math.log10(span / 400)));
  }

  function controlRow(name, spec) {
    const row = el("div", {class: "ctl", "data-control": name});
    row.append(el("label", {for: `ctl-${name}`, text: label(name), title: name}));
    if (spec.type === "choice") {
      const sel = el("select", {id: `ctl-${name}`});
      for (const c of spec.choices) sel.append(el("option", {text: c}));
      sel.addEventListener("change", () => edit(name, sel.value));
      row.append(sel, el("span"), el("span", {class: "eff"}));
      return row;
    }
    const [lo, hi] = spec.range;
    const step = stepFor(spec);
    const num = el("input", {type: "number", id: `num-${name}`, min: lo, max: hi, step});
    const wide = spec.type === "integer" && hi - lo > 512;  // a slider would be too coarse: the box alone
    const slider = wide ? el("span") : el("input", {type: "range", id: `ctl-${name}`, min: lo, max: hi, step});
    if (wide) num.id = `ctl-${name}`;
    const value = (text) => {
      const v = Number(text);
      return spec.type === "integer" ? Math.round(clamp(v, lo, hi)) : clamp(v, lo, hi);
    };
    if (!wide) {
      slider.addEventListener("input", () => { num.value = slider.value; edit(name, value(slider.value)); });
    }
    num.addEventListener("change", () => {
      if (num.value === "" || !Number.isFinite(Number(num.value))) return;
      const v = value(num.value);
      num.value = v;
      if (!wide) slider.value = v;
      edit(name, v);
    });
    row.append(slider, num, el("span", {class: "eff", title: "the value the last chunk used (LFOs, glides)"}));
    return row;
  }

  // A change to one control: sent (with the glide) within SEND_MS, merged with others made meanwhile.
  function edit(name, value) {
    app.edited.set(name, performance.now());
    app.outbox.set(name, value);
    if (app.timer === null) app.timer = setTimeout(flush, SEND_MS);
  }

  function flush() {
    app.timer = null;
    if (!app.outbox.size) return;
    const msg = {set: Object.fromEntries(app.outbox)};
    app.outbox.clear();
    const glide = Math.round(Number($("glide").value) || 0);
    if (glide > 0) msg.morph_chunks = glide;
    send(msg);
  }

  // ------------------------------------------------------------------ state

  function showState(s) {
    app.state = s;
    if (!app.reference) return;
    for (const [name, spec] of Object.entries(app.reference.controls)) {
      if (spec.type === "vector" || name === "seed" || !(name in s) || held(name)) continue;
      const ctl = $(`ctl-${name}`), num = $(`num-${name}`);
      if (ctl && !busy(ctl)) ctl.value = s[name];
      if (num && !busy(num)) num.value = s[name];
      const row = document.querySelector(`[data-control="${name}"] .eff`);
      const eff = s.effective && s.effective[name];
      if (row) row.textContent = eff != null && eff !== s[name] ? `→ ${fmt(eff)}` : "";
    }
    $("seed-now").textContent = s.seed;
    $("seed-fade").textContent = s.crossfade ? `crossfading ${s.crossfade[0]}/${s.crossfade[1]}` : "";
    $("display-events").checked = !!(s.events && (s.events.waveform || s.events.latents));
    showPresets(s.presets);
    showSteering(s);
    showLfos(s.lfos || []);
  }

  function showPresets(names) {
    const list = $("preset-list");
    $("presets-off").hidden = names !== null && names !== undefined;
    const key = JSON.stringify(names || []);
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    const keep = list.value;
    list.replaceChildren(...(names || []).map((n) => el("option", {text: n})));
    if ((names || []).includes(keep)) list.value = keep;
  }

  // ------------------------------------------------------------------ steering: 8 token sliders x 64 channel bars

  function buildSteering(reference) {
    const box = $("token-sliders");
    const n = reference.controls.token_bias ? reference.controls.token_bias.length : 8;
    for (let i = 0; i < n; i++) {
      const s = el("input", {type: "range", id: `tok-${i}`, min: -4, max: 4, step: 0.01, value: 0,
        title: `token ${i}`});
      s.addEventListener("input", () => {
        const name = `token_${app.mode}`;
        const v = (app.tokens[name] || []).slice();
        v[i] = Number(s.value);
        app.tokens[name] = v;
        drawGrid();
        editVector(name, v);
      });
      box.append(el("div", {class: "tok"}, el("span", {text: i}), s));
    }
    for (const radio of document.querySelectorAll('input[name="steer-mode"]')) {
      radio.addEventListener("change", () => { app.mode = radio.value; showSteering(app.state || {}, true); });
    }
    const canvas = $("channels");
    let last = null;
    const at = (ev) => {
      const r = canvas.getBoundingClientRect();
      const count = (app.channels[`channel_${app.mode}`] || []).length || 64;
      const [lo, hi] = STEER_RANGE[app.mode];
      const c = clamp(Math.floor((ev.clientX - r.left) / r.width * count), 0, count - 1);
      const v = hi - clamp((ev.clientY - r.top) / r.height, 0, 1) * (hi - lo);
      return [c, Math.round(v * 100) / 100];
    };
    const paint = (ev) => {
      const name = `channel_${app.mode}`;
      const values = (app.channels[name] || []).slice();
      const [c, v] = at(ev);
      const [from, fromV] = last || [c, v];
      const steps = Math.abs(c - from);  // fill the columns a fast drag skipped
      for (let k = 0; k <= steps; k++) {
        const col = from + Math.sign(c - from) * k;
        values[col] = steps ? Math.round((fromV + (v - fromV) * k / steps) * 100) / 100 : v;
      }
      last = [c, v];
      app.channels[name] = values;
      drawChannels();
      drawGrid();
      editVector(name, values);
    };
    canvas.addEventListener("pointerdown", (ev) => {
      canvas.setPointerCapture(ev.pointerId);
      canvas.dataset.dragging = "1";
      last = null;
      paint(ev);
    });
    canvas.addEventListener("pointermove", (ev) => { if (canvas.dataset.dragging === "1") paint(ev); });
    const stop = () => { canvas.dataset.dragging = "0"; last = null; };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    canvas.addEventListener("dblclick", (ev) => {
      const name = `channel_${app.mode}`;
      const values = (app.channels[name] || []).slice();
      values[at(ev)[0]] = NEUTRAL[app.mode];
      app.channels[name] = values;
      drawChannels();
      drawGrid();
      editVector(name, values);
    });
    $("rand-spread").addEventListener("input", () => { $("rand-spread-out").textContent = $("rand-spread").value; });
    $("btn-randomise").addEventListener("click", () => {
      const msg = {randomise: {what: $("rand-what").value, spread: Number($("rand-spread").value)}};
      const glide = Math.round(Number($("glide").value) || 0);
      if (glide > 0) msg.randomise.morph_chunks = glide;
      send(msg);
    });
    for (const b of document.querySelectorAll("button[data-reset]")) {
      b.addEventListener("click", () => send({reset: b.dataset.reset}));
    }
  }

  function editVector(name, values) {
    edit(name, values.map((v) => (v == null ? NEUTRAL[app.mode] : v)));
  }

  function showSteering(s, force = false) {
    for (const mode of ["bias", "scale"]) {
      for (const [kind, store] of [["token", app.tokens], ["channel", app.channels]]) {
        const name = `${kind}_${mode}`;
        if (s[name] && (force || !held(name))) store[name] = s[name].slice();
      }
    }
    const tokens = app.tokens[`token_${app.mode}`] || [];
    tokens.forEach((v, i) => {
      const slider = $(`tok-${i}`);
      if (slider && !busy(slider) && (force || !held(`token_${app.mode}`))) slider.value = v;
    });
    if ($("channels").dataset.dragging !== "1") drawChannels();
    drawGrid();
  }

  function diverging(v, lo, hi, mid) {
    // blue below mid, dark at mid, red above
    const t = v >= mid ? clamp((v - mid) / (hi - mid), 0, 1) : -clamp((mid - v) / (mid - lo), 0, 1);
    const base = [24, 27, 34];
    const to = t >= 0 ? [255, 96, 80] : [80, 160, 255];
    const a = Math.abs(t);
    return `rgb(${base.map((b, k) => Math.round(b + (to[k] - b) * a)).join(",")})`;
  }

  function drawChannels() {
    const canvas = $("channels"), g = canvas.getContext("2d");
    const values = app.channels[`channel_${app.mode}`] || [];
    const [lo, hi] = STEER_RANGE[app.mode], mid = NEUTRAL[app.mode];
    const w = canvas.width / Math.max(values.length, 1), h = canvas.height;
    const y = (v) => (hi - clamp(v, lo, hi)) / (hi - lo) * h;
    g.clearRect(0, 0, canvas.width, h);
    g.fillStyle = "#3a4050";
    g.fillRect(0, y(mid), canvas.width, 1);
    values.forEach((v, c) => {
      g.fillStyle = diverging(v, lo, hi, mid);
      const top = Math.min(y(v), y(mid)), bottom = Math.max(y(v), y(mid));
      g.fillRect(c * w + 1, top, Math.max(w - 2, 1), Math.max(bottom - top, 1));
    });
  }

  function drawGrid() {
    const canvas = $("grid"), g = canvas.getContext("2d");
    const tokens = app.tokens[`token_${app.mode}`] || [], channels = app.channels[`channel_${app.mode}`] || [];
    if (!tokens.length || !channels.length) return;
    const [lo, hi] = STEER_RANGE[app.mode], mid = NEUTRAL[app.mode];
    const w = canvas.width / channels.length, h = canvas.height / tokens.length;
    tokens.forEach((t, r) => channels.forEach((c, k) => {
      const v = app.mode === "bias" ? t + c : t * c;  // what a latent of 0 (bias) or 1 (scale) becomes
      g.fillStyle = diverging(v, lo, hi, mid);
      g.fillRect(Math.floor(k * w), Math.floor(r * h), Math.ceil(w), Math.ceil(h));
    }));
    g.fillStyle = "rgba(138,144,160,0.18)";  // token rows and groups of 8 channels
    for (let r = 1; r < tokens.length; r++) g.fillRect(0, Math.floor(r * h), canvas.width, 1);
    for (let k = 8; k < channels.length; k += 8) g.fillRect(Math.floor(k * w), 0, 1, canvas.height);
  }

  // ------------------------------------------------------------------ display events

  function drawHeat(grid) {
    const canvas = $("heat"), g = canvas.getContext("2d");
    const rows = grid.length, cols = grid[0].length;
    const w = canvas.width / cols, h = canvas.height / rows;
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        g.fillStyle = diverging(grid[r][c], -3, 3, 0);
        g.fillRect(Math.floor(c * w), Math.floor(r * h), Math.ceil(w), Math.ceil(h));
      }
    }
    canvas.dataset.index = String(app.heatCount = (app.heatCount || 0) + 1);
  }

  function drawMeter(e) {
    const canvas = $("meter"), g = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, bar = (H - 6) / 2;
    const x = (amp) => clamp((20 * Math.log10(Math.max(amp, 1e-6)) + 60) / 60, 0, 1) * W;  // -60..0 dBFS
    g.clearRect(0, 0, W, H);
    for (let ch = 0; ch < e.peak.length; ch++) {
      const top = 2 + ch * (bar + 2);
      g.fillStyle = "#262a34";
      g.fillRect(0, top, W, bar);
      const rms = e.rms[ch], peak = e.peak[ch];
      g.fillStyle = peak >= 0.98 ? "#ff6b6b" : rms > 0.5 ? "#f0b44c" : "#6fd08c";
      g.fillRect(0, top, x(rms), bar);
      g.fillStyle = "#d8dbe2";
      g.fillRect(x(peak) - 1, top, 2, bar);
    }
    canvas.dataset.index = String(app.meterCount = (app.meterCount || 0) + 1);
  }

  function drawWave(e) {
    const canvas = $("wave"), g = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, n = e.points;
    g.clearRect(0, 0, W, H);
    e.min.forEach((mins, ch) => {
      g.fillStyle = ch === 0 ? "rgba(95,179,255,0.75)" : "rgba(240,180,76,0.55)";
      for (let i = 0; i < n; i++) {
        const y0 = (1 - e.max[ch][i]) / 2 * H, y1 = (1 - mins[i]) / 2 * H;
        g.fillRect(i / n * W, y0, Math.max(W / n - 0.5, 1), Math.max(y1 - y0, 1));
      }
    });
  }

  $("display-events").addEventListener("change", (ev) => {
    const on = ev.target.checked;
    send({events: {waveform: on, latents: on}});
  });

  // ------------------------------------------------------------------ seed and presets

  $("btn-seed-crossfade").addEventListener("click", () => send({seed: "random", mode: "crossfade"}));
  $("btn-seed-cut").addEventListener("click", () => send({seed: "random", mode: "cut"}));
  $("btn-seed-set").addEventListener("click", () => {
    const text = $("seed-value").value.trim();
    if (!/^\d{1,19}$/.test(text)) { status("a seed is a whole number 0..2^63-1", "error"); return; }
    sendText(`{"seed": ${text}, "mode": ${JSON.stringify($("seed-mode").value)}}`);  // exact beyond 2^53
  });
  $("btn-preset-save").addEventListener("click", () => {
    const name = $("preset-name").value.trim();
    if (name) send({preset: {save: name}});
  });
  $("btn-preset-recall").addEventListener("click", () => {
    const name = $("preset-list").value;
    if (name) send({preset: {recall: name, morph_chunks: Math.round(Number($("preset-morph").value) || 0)}});
  });
  $("btn-preset-delete").addEventListener("click", () => {
    const name = $("preset-list").value;
    if (name && confirm(`Delete preset "${name}"?`)) send({preset: {delete: name}});
  });

  // ------------------------------------------------------------------ LFOs

  function lfoFields(lfoRef, lfo, onChange) {
    const targets = el("select", {class: "lfo-target"});
    for (const t of lfoRef.targets) targets.append(el("option", {text: t}));
    const shapes = el("select", {class: "lfo-shape"});
    for (const s of lfoRef.shapes) shapes.append(el("option", {text: s}));
    const units = el("select", {class: "lfo-unit"});
    for (const u of lfoRef.units) units.append(el("option", {text: u}));
    const f = {
      target: targets, shape: shapes, unit: units,
      index: el("input", {type: "number", class: "lfo-index", min: 0, step: 1, placeholder: "all"}),
      rate: el("input", {type: "number", class: "lfo-rate", min: 0, step: "any"}),
      depth: el("input", {type: "number", class: "lfo-depth", step: "any"}),
      phase: el("input", {type: "number", class: "lfo-phase", min: 0, max: 1, step: 0.05}),
      on: el("input", {type: "checkbox", class: "lfo-on"}),
    };
    f.target.value = lfo.target;
    f.index.value = lfo.index == null ? "" : lfo.index;
    f.shape.value = lfo.shape;
    f.rate.value = lfo.rate;
    f.unit.value = lfo.unit;
    f.depth.value = lfo.depth;
    f.phase.value = lfo.phase;
    f.on.checked = lfo.on;
    const vectorTarget = () => app.reference.controls[f.target.value].type === "vector";
    f.index.disabled = !vectorTarget();
    for (const [key, input] of Object.entries(f)) {
      input.addEventListener("change", () => {
        if (key === "target") { f.index.disabled = !vectorTarget(); f.index.value = ""; }
        if (onChange) onChange(key, read(f, key));
      });
    }
    return f;
  }

  function read(f, key) {
    const input = f[key];
    if (key === "on") return input.checked;
    if (key === "index") return input.value === "" ? null : Math.round(Number(input.value));
    if (input.type === "number") return Number(input.value);
    return input.value;
  }

  function showLfos(lfos) {
    const key = JSON.stringify(lfos);
    const body = $("lfo-rows");
    if (key === app.lfoKey || body.contains(document.activeElement) || !app.reference) return;
    app.lfoKey = key;
    body.replaceChildren(...lfos.map((lfo) => {
      const f = lfoFields(app.reference.lfo, lfo, (field, value) => {
        const msg = {id: lfo.id, [field]: value};
        if (field === "target") msg.index = null;
        send({lfo: msg});
      });
      const remove = el("button", {text: "×", title: `remove ${lfo.id}`,
        onclick: () => send({lfo: {id: lfo.id, remove: true}})});
      return el("tr", {"data-lfo": lfo.id}, el("td", {text: lfo.id}),
        ...["target", "index", "shape", "rate", "unit", "depth", "phase", "on"].map((k) => el("td", {}, f[k])),
        el("td", {}, remove));
    }));
  }

  function buildLfoForm(lfoRef) {
    const id = el("input", {type: "text", class: "lfo-id", id: "lfo-new-id", placeholder: "id", maxlength: 32});
    const f = lfoFields(lfoRef, {target: lfoRef.targets.includes("temperature") ? "temperature" : lfoRef.targets[0],
      index: null, shape: "sine", rate: 16, unit: "chunks", depth: 0.2, phase: 0, on: true}, null);
    const add = el("button", {text: "Add", id: "btn-lfo-add", onclick: () => {
      const taken = new Set(((app.state && app.state.lfos) || []).map((l) => l.id));
      let name = id.value.trim();
      for (let k = 1; !name; k++) if (!taken.has(`lfo${k}`)) name = `lfo${k}`;
      const msg = {id: name};
      for (const k of ["target", "index", "shape", "rate", "unit", "depth", "phase", "on"]) msg[k] = read(f, k);
      send({lfo: msg});
      id.value = "";
    }});
    $("lfo-new").append(el("tr", {}, el("td", {}, id),
      ...["target", "index", "shape", "rate", "unit", "depth", "phase", "on"].map((k) => el("td", {}, f[k])),
      el("td", {}, add)));
  }

  connect();
})();
