/* imgsim search page: plain JavaScript, no framework, no build step.
 *
 * Talks to the same-origin JSON API (/healthz, /search, /images/{id}, /batches,
 * /duplicates, /clusters, /evaluation, /compare). If the page was opened as /?token=…, every fetch
 * carries "Authorization: Bearer …" and every <img src> carries ?token=….
 * All API data goes into the DOM through textContent / attributes, never HTML.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- settings
  const VIEWS = ['search', 'duplicates', 'clusters', 'quality'];
  const THUMB = 256;             // thumbnail box for results and previews
  const STRIP_THUMB = 160;       // thumbnail box requested for group/cluster rows
  const DUP_PER_PAGE = 20;
  const CLU_PER_PAGE = 12;
  const CLU_SAMPLES = 8;

  const TOKEN = new URLSearchParams(window.location.search).get('token') || '';

  // ---------------------------------------------------------------- elements
  const $ = (id) => document.getElementById(id);
  const el = {
    error: $('error'),
    randomWeights: $('random-weights'),
    indexSize: $('index-size'),
    encoder: $('encoder'),
    indexVersion: $('index-version'),
    dropzone: $('dropzone'),
    fileInput: $('file-input'),
    queryFigure: $('query-figure'),
    queryPreview: $('query-preview'),
    queryCaption: $('query-caption'),
    queryStage: $('query-stage'),
    queryBox: $('query-box'),
    regionHint: $('region-hint'),
    clearBox: $('clear-box'),
    compareDialog: $('compare-dialog'),
    compareSummary: $('compare-summary'),
    compareError: $('compare-error'),
    comparePanels: $('compare-panels'),
    compareSides: [$('compare-a'), $('compare-b')],
    legendLow: $('legend-low'),
    legendHigh: $('legend-high'),
    queryNote: $('query-note'),
    options: $('search-options'),
    k: $('k'),
    batchFilter: $('batch-filter'),
    batchFilterEmpty: $('batch-filter-empty'),
    photoFilter: $('photo-filter'),
    takenFrom: $('taken-from'),
    takenTo: $('taken-to'),
    camera: $('camera'),
    minPixels: $('min-pixels'),
    clearPhotoFilter: $('clear-photo-filter'),
    took: $('took'),
    results: $('results'),
    resultsEmpty: $('results-empty'),
    duplicates: $('duplicates'),
    clusters: $('clusters'),
    quality: $('quality'),
    qualityRandom: $('quality-random'),
    qualitySummary: $('quality-summary'),
  };

  // ------------------------------------------------------------------- state
  const state = {
    view: 'search',
    query: null,          // {kind: 'file', file} | {kind: 'id', imageId, path?, batch?}
    previewUrl: null,     // object URL of the current uploaded query
    searchSeq: 0,         // guards against out-of-order search responses
    box: null,            // {fx0, fy0, fx1, fy1}: the searched region, as fractions of the query picture
    compareFrom: null,    // the indexed image the hits are compared with ("why?"), if the query is one
    compare: null,        // what the compare dialog shows: {seq, data, hover}
    pagers: {
      duplicates: makePager('duplicates', DUP_PER_PAGE, loadDuplicates),
      clusters: makePager('clusters', CLU_PER_PAGE, loadClusters),
    },
    quality: { seq: 0, loaded: false, loader: loadQuality },
  };

  // --------------------------------------------------------------- utilities
  function withToken(params) {
    if (TOKEN) params.set('token', TOKEN);
    return params;
  }

  function imageUrl(imageId, size) {
    const params = new URLSearchParams();
    if (size) params.set('size', String(size));
    withToken(params);
    const qs = params.toString();
    return '/images/' + encodeURIComponent(String(imageId)) + (qs ? '?' + qs : '');
  }

  function node(tag, className, text) {
    const n = document.createElement(tag);
    if (className) n.className = className;
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }

  function fmtScore(x) {
    const v = Number(x);
    return Number.isFinite(v) ? v.toFixed(3) : '—';
  }

  function fmtMs(x) {
    const v = Number(x);
    return Number.isFinite(v) ? v.toFixed(1) : '?';
  }

  function basename(path) {
    if (!path) return '';
    const s = String(path);
    const i = Math.max(s.lastIndexOf('/'), s.lastIndexOf('\\'));
    return i >= 0 ? s.slice(i + 1) : s;
  }

  function thumb(imageId, size, alt) {
    const img = document.createElement('img');
    img.className = 'thumb';
    img.src = imageUrl(imageId, size);
    img.alt = alt || ('Image ' + imageId);
    img.width = size;
    img.height = size;
    img.loading = 'lazy';
    img.decoding = 'async';
    img.draggable = true;
    img.addEventListener('error', () => img.classList.add('broken'), { once: true });
    img.addEventListener('dragstart', (e) => {
      // Dragging a thumbnail onto the drop zone searches by that image.
      e.dataTransfer.setData('application/x-imgsim-image-id', String(imageId));
      e.dataTransfer.effectAllowed = 'copy';
    });
    return img;
  }

  // ------------------------------------------------------------------ errors
  class ApiError extends Error {
    constructor(status, code, detail, retryAfter) {
      super(detail || code || ('HTTP ' + status));
      this.status = status;
      this.code = code || '';
      this.detail = detail || '';
      this.retryAfter = retryAfter || null;
    }
  }

  function describeError(err, action) {
    if (!(err instanceof ApiError)) {
      return action + ' failed: ' + (err && err.message ? err.message : String(err));
    }
    const what = err.code ? ' ' + err.code : '';
    const detail = err.detail ? ': ' + err.detail : '';
    switch (err.status) {
      case 0:
        return action + ' failed: cannot reach the server' + detail;
      case 401:
      case 403:
        return action + ' failed (' + err.status + what + '): ' +
          (TOKEN ? 'the access token was rejected.' : 'this server needs an access token; open the page as /?token=…') +
          (err.detail ? ' (' + err.detail + ')' : '');
      case 413:
        return action + ' failed (413' + what + '): the upload is too large' + detail;
      case 503: {
        const retry = err.retryAfter ? ' Try again in ' + err.retryAfter + ' s.' : ' Try again shortly.';
        return action + ' failed (503' + what + '): the server is busy' + detail + '.' + retry;
      }
      default:
        return action + ' failed (' + err.status + what + ')' + detail;
    }
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = '';
    el.error.hidden = true;
  }

  // ----------------------------------------------------------------- network
  // Image ids are 64-bit integers, beyond the 2^53 a JavaScript number holds
  // exactly: read them as strings, or /images/{id} and ?image_id= get a
  // rounded id (404). Inside a JSON string the quotes are escaped, so only
  // real "image_id" keys match.
  function parseJson(text) {
    return JSON.parse(text.replace(/"(image_id|suggested_keeper)"(\s*):(\s*)(-?\d+)/g, '"$1"$2:$3"$4"'));
  }

  async function api(path, params, init) {
    // The token travels in the Authorization header for fetches, not in the URL.
    const qs = (params || new URLSearchParams()).toString();
    const headers = new Headers((init && init.headers) || {});
    headers.set('Accept', 'application/json');
    if (TOKEN) headers.set('Authorization', 'Bearer ' + TOKEN);

    let resp;
    try {
      resp = await fetch(path + (qs ? '?' + qs : ''), Object.assign({}, init, {
        headers: headers,
        credentials: 'same-origin',
        cache: 'no-store',
      }));
    } catch (e) {
      throw new ApiError(0, 'network_error', e && e.message ? e.message : String(e));
    }

    let body = null;
    const ctype = resp.headers.get('content-type') || '';
    if (ctype.includes('json')) {
      try { body = parseJson(await resp.text()); } catch (_) { body = null; }
    } else if (!resp.ok) {
      try {
        const text = (await resp.text()).trim();
        body = { detail: text.slice(0, 300) };
      } catch (_) { body = null; }
    }

    if (!resp.ok) {
      const retryRaw = resp.headers.get('retry-after');
      let retry = null;
      if (retryRaw) {
        const n = parseInt(retryRaw, 10);
        if (String(n) === retryRaw.trim()) retry = n;
        else {
          const when = Date.parse(retryRaw);
          if (!Number.isNaN(when)) retry = Math.max(0, Math.round((when - Date.now()) / 1000));
        }
      }
      const code = body && body.error ? String(body.error) : (resp.statusText || '');
      const detail = body && body.detail !== undefined && body.detail !== null
        ? (typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail))
        : '';
      throw new ApiError(resp.status, code, detail, retry);
    }
    if (body === null) {
      throw new ApiError(resp.status, 'bad_response', 'the server did not answer with JSON');
    }
    return body;
  }

  // ------------------------------------------------------------------ header
  async function loadHealth() {
    try {
      const h = await api('/healthz');
      renderHealth(h);
    } catch (err) {
      el.indexSize.textContent = '?';
      el.encoder.textContent = '?';
      el.indexVersion.textContent = '?';
      showError(describeError(err, 'Loading server status'));
    }
  }

  function renderHealth(h) {
    setIndexSize(h.num_vectors);
    const enc = h.encoder || {};
    const parts = [];
    if (enc.model) parts.push(String(enc.model));
    if (enc.pooling) parts.push('pooling: ' + enc.pooling);
    if (h.weights_fingerprint) parts.push('weights ' + shortFingerprint(h.weights_fingerprint));
    el.encoder.textContent = parts.length ? parts.join(', ') : 'unknown';
    el.encoder.dataset.weightsFingerprint = h.weights_fingerprint ? String(h.weights_fingerprint) : '';
    el.encoder.dataset.model = enc.model ? String(enc.model) : '';
    el.encoder.dataset.pooling = enc.pooling ? String(enc.pooling) : '';
    el.encoder.title = enc.weights_file ? 'Weights: ' + enc.weights_file : '';
    el.indexVersion.textContent = h.index_version ? String(h.index_version) : '—';
    el.randomWeights.hidden = h.random_weights !== true;
  }

  function shortFingerprint(f) {
    const text = String(f);
    return text.startsWith('sha256:') ? text.slice(0, 19) + '…' : text;
  }

  function setIndexSize(n) {
    if (n === undefined || n === null) return;
    el.indexSize.textContent = String(n);
    el.indexSize.dataset.numVectors = String(n);
  }

  // ----------------------------------------------------------------- batches
  async function loadBatches() {
    let data;
    try {
      data = await api('/batches');
    } catch (err) {
      el.batchFilterEmpty.textContent = 'Batches unavailable (' + describeError(err, 'Loading batches') + ')';
      return;
    }
    const batches = Array.isArray(data.batches) ? data.batches : [];
    // Remove previous options, keep the legend and the hint.
    el.batchFilter.querySelectorAll('.batch-option').forEach((n) => n.remove());
    if (!batches.length) {
      el.batchFilterEmpty.textContent = 'No batches.';
      el.batchFilterEmpty.hidden = false;
      return;
    }
    el.batchFilterEmpty.hidden = true;
    for (const b of batches) {
      const label = node('label', 'batch-option');
      const box = document.createElement('input');
      box.type = 'checkbox';
      box.name = 'batch';
      box.value = String(b.name);
      label.append(box, ' ', node('span', 'batch-name', b.name));
      if (b.num_images !== undefined && b.num_images !== null) {
        label.append(' ', node('span', 'batch-count', '(' + b.num_images + ')'));
      }
      el.batchFilter.append(label);
    }
  }

  function selectedBatches() {
    return Array.from(el.batchFilter.querySelectorAll('input[name="batch"]:checked')).map((b) => b.value);
  }

  // The day after an <input type="date"> value (YYYY-MM-DD), computed in UTC so that no
  // local daylight-saving change moves it.
  function nextDay(isoDate) {
    const d = new Date(isoDate + 'T00:00:00Z');
    d.setUTCDate(d.getUTCDate() + 1);
    return d.toISOString().slice(0, 10);
  }

  // The API's photo filters: taken_before is exclusive, so "through" a day is before the next.
  function photoFilterParams(params) {
    if (el.takenFrom.value) params.set('taken_after', el.takenFrom.value);
    if (el.takenTo.value) params.set('taken_before', nextDay(el.takenTo.value));
    const camera = el.camera.value.trim();
    if (camera) params.set('camera', camera);
    if (el.minPixels.value) params.set('min_pixels', el.minPixels.value);
    return params;
  }

  function photoFiltered() {
    return Boolean(el.takenFrom.value || el.takenTo.value || el.camera.value.trim() || el.minPixels.value);
  }

  // ------------------------------------------------------------------ search
  function searchParams() {
    const params = new URLSearchParams();
    params.set('k', el.k.value || '10');
    for (const b of selectedBatches()) params.append('batch', b);
    return photoFilterParams(params);
  }

  function setPreviewFromFile(file) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    el.queryPreview.classList.remove('broken');
    el.queryPreview.src = state.previewUrl;
    el.queryPreview.alt = 'Query image: ' + (file.name || 'pasted image');
    el.queryCaption.textContent = (file.name || 'Pasted image') +
      (file.size ? ' · ' + Math.max(1, Math.round(file.size / 1024)) + ' KiB' : '');
    el.queryFigure.hidden = false;
  }

  function setPreviewFromId(imageId, path, batch) {
    if (state.previewUrl) { URL.revokeObjectURL(state.previewUrl); state.previewUrl = null; }
    el.queryPreview.classList.remove('broken');
    el.queryPreview.src = imageUrl(imageId, THUMB);
    el.queryPreview.alt = 'Query image: ' + (path ? basename(path) : imageId);
    el.queryCaption.textContent = (path || ('Image ' + imageId)) + (batch ? ' · ' + batch : '');
    el.queryFigure.hidden = false;
  }

  function searchByFile(file) {
    if (!file) return;
    state.query = { kind: 'file', file: file };
    setBox(null);
    setPreviewFromFile(file);
    return runSearch();
  }

  function searchById(imageId, path, batch) {
    state.query = { kind: 'id', imageId: String(imageId), path: path, batch: batch };
    setBox(null);
    setPreviewFromId(imageId, path, batch);
    return runSearch();
  }

  async function runSearch() {
    const q = state.query;
    if (!q) return;
    const seq = ++state.searchSeq;
    clearError();
    el.queryNote.hidden = true;
    el.queryNote.textContent = '';
    el.results.setAttribute('aria-busy', 'true');
    el.took.textContent = 'Searching…';
    delete el.took.dataset.tookMs;
    delete el.took.dataset.numVectors;

    const params = searchParams();
    let data;
    try {
      if (state.box) params.set('box', await boxParam(q));
      if (q.kind === 'file') {
        const form = new FormData();
        form.append('image', q.file, q.file.name || 'pasted-image');
        data = await api('/search', params, { method: 'POST', body: form });
      } else {
        params.set('image_id', q.imageId);
        data = await api('/search', params, { method: 'GET' });
      }
    } catch (err) {
      if (seq !== state.searchSeq) return;
      el.results.setAttribute('aria-busy', 'false');
      el.results.replaceChildren();
      el.resultsEmpty.hidden = true;
      el.took.textContent = '';
      showError(describeError(err, 'Search'));
      return;
    }
    if (seq !== state.searchSeq) return;
    el.results.setAttribute('aria-busy', 'false');
    renderSearch(data);
  }

  function renderSearch(data) {
    const hits = Array.isArray(data.hits) ? data.hits : [];
    state.compareFrom = comparableQuery(data, hits);
    el.results.replaceChildren(...hits.map(hitElement));
    el.resultsEmpty.hidden = hits.length > 0;
    el.resultsEmpty.textContent = photoFiltered()
      ? 'No results pass the photo filter' + (selectedBatches().length ? ' in the selected batches.' : '.')
      : (selectedBatches().length ? 'No results in the selected batches.' : 'No results.');

    el.took.textContent = hits.length + (hits.length === 1 ? ' result' : ' results') +
      ' in ' + fmtMs(data.took_ms) + ' ms · ' +
      (data.num_vectors !== undefined && data.num_vectors !== null ? data.num_vectors : '?') +
      ' vectors searched';
    if (data.took_ms !== undefined && data.took_ms !== null) el.took.dataset.tookMs = String(data.took_ms);
    if (data.num_vectors !== undefined && data.num_vectors !== null) el.took.dataset.numVectors = String(data.num_vectors);
    setIndexSize(data.num_vectors);

    const q = data.query || {};
    const note = q.message || q.reason;
    if (note) {
      el.queryNote.textContent = String(note);
      if (q.reason) el.queryNote.dataset.reason = String(q.reason);
      el.queryNote.hidden = false;
    } else {
      delete el.queryNote.dataset.reason;
    }
  }

  function hitElement(hit) {
    const li = node('li', 'hit');
    li.dataset.imageId = String(hit.image_id);
    if (hit.rank !== undefined && hit.rank !== null) li.dataset.rank = String(hit.rank);
    li.dataset.score = String(hit.score);
    const copies = Number(hit.copies) || 1;
    li.dataset.copies = String(copies);

    const button = node('button', 'hit-button');
    button.type = 'button';
    button.title = 'Search by this image' +
      (hit.inner_product !== undefined && hit.inner_product !== null
        ? ' (inner product ' + fmtScore(hit.inner_product) + ')' : '');
    button.append(thumb(hit.image_id, THUMB, basename(hit.path) || ('Image ' + hit.image_id)));

    const meta = node('span', 'hit-meta');
    const line = node('span', 'hit-line');
    if (hit.rank !== undefined && hit.rank !== null) line.append(node('span', 'rank', '#' + hit.rank));
    const score = node('span', 'score', fmtScore(hit.score));
    score.title = 'score';
    line.append(score);
    if (copies > 1) {
      line.append(node('span', 'copies', '+' + (copies - 1) + ' identical'));
    }
    meta.append(line);
    const path = node('span', 'path', hit.path || '');
    path.title = hit.path || '';
    meta.append(path, node('span', 'batch', hit.batch || ''));
    button.append(meta);

    button.addEventListener('click', () => {
      searchById(hit.image_id, hit.path, hit.batch);
      window.scrollTo({ top: 0, behavior: 'smooth' });
    });
    li.append(button);
    if (state.compareFrom !== null && String(hit.image_id) !== state.compareFrom) {
      li.append(whyButton(state.compareFrom, hit));
    }
    return li;
  }

  // ------------------------------------------------------- query input: file
  el.fileInput.addEventListener('change', () => {
    const file = el.fileInput.files && el.fileInput.files[0];
    if (file) {
      searchByFile(file);
    }
    // Allow choosing the same file again.
    el.fileInput.value = '';
  });

  // Clicking the drop zone background opens the file chooser.
  el.dropzone.addEventListener('click', (e) => {
    if (e.target === el.fileInput || e.target.closest('label')) return;
    el.fileInput.click();
  });

  // ------------------------------------------------------- query input: drop
  function dragHasPayload(e) {
    const types = e.dataTransfer ? Array.from(e.dataTransfer.types || []) : [];
    return types.includes('Files') || types.includes('application/x-imgsim-image-id');
  }

  function handleDrop(e) {
    const dt = e.dataTransfer;
    if (!dt) return;
    const file = dt.files && dt.files[0];
    if (file) {
      setView('search');
      searchByFile(file);
      return;
    }
    const id = dt.getData('application/x-imgsim-image-id');
    if (id) {
      setView('search');
      searchById(id);
    }
  }

  let dragDepth = 0;
  el.dropzone.addEventListener('dragenter', (e) => {
    if (!dragHasPayload(e)) return;
    e.preventDefault();
    dragDepth += 1;
    el.dropzone.classList.add('dragover');
  });
  el.dropzone.addEventListener('dragover', (e) => {
    if (!dragHasPayload(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = 'copy';
    el.dropzone.classList.add('dragover');
  });
  el.dropzone.addEventListener('dragleave', () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.dropzone.classList.remove('dragover');
  });
  el.dropzone.addEventListener('drop', (e) => {
    e.preventDefault();
    e.stopPropagation();
    dragDepth = 0;
    el.dropzone.classList.remove('dragover');
    handleDrop(e);
  });

  // A file dropped anywhere else on the search view also searches, and a
  // stray drop elsewhere must not navigate the browser away to the file.
  window.addEventListener('dragover', (e) => {
    if (!dragHasPayload(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = state.view === 'search' ? 'copy' : 'none';
  });
  window.addEventListener('drop', (e) => {
    if (!dragHasPayload(e)) return;
    e.preventDefault();
    if (state.view === 'search') handleDrop(e);
  });

  // ------------------------------------------------------ query input: paste
  document.addEventListener('paste', (e) => {
    const cd = e.clipboardData;
    if (!cd) return;
    let file = null;
    if (cd.items) {
      for (const item of cd.items) {
        if (item.kind === 'file' && item.type && item.type.startsWith('image/')) {
          file = item.getAsFile();
          if (file) break;
        }
      }
    }
    if (!file && cd.files && cd.files.length) {
      file = Array.from(cd.files).find((f) => f.type && f.type.startsWith('image/')) || null;
    }
    if (!file) {
      if (state.view === 'search') showError('Paste: the clipboard holds no image.');
      return;
    }
    e.preventDefault();
    if (!file.name) {
      const ext = (file.type.split('/')[1] || 'png').replace(/[^a-z0-9]/gi, '');
      file = new File([file], 'pasted.' + ext, { type: file.type });
    }
    setView('search');
    searchByFile(file);
  });

  // ---------------------------------------------------------- query region
  // A box dragged on the preview (mouse, pen or touch) searches that region of the picture
  // only. It is kept as fractions of the picture and sent in the picture's own pixels, as a
  // person sees it: browsers draw the preview upright from its EXIF orientation, as the
  // server reads it.
  const MIN_DRAG = 6;  // CSS pixels: a shorter drag is a click, not a box

  function clamp01(v) { return Math.min(1, Math.max(0, v)); }

  // Where a picture lies in its <img> (object-fit: contain centres it, margins around), in
  // the page's coordinates; null before it has loaded.
  function pictureRect(img) {
    const r = img.getBoundingClientRect();
    const nw = img.naturalWidth, nh = img.naturalHeight;
    if (!nw || !nh || !r.width || !r.height || img.classList.contains('broken')) return null;
    const scale = Math.min(r.width / nw, r.height / nh);
    const w = nw * scale, h = nh * scale;
    return { left: r.left + (r.width - w) / 2, top: r.top + (r.height - h) / 2, width: w, height: h };
  }

  function drawBox(b) {
    const rect = b ? pictureRect(el.queryPreview) : null;
    if (!rect) {
      el.queryBox.hidden = true;
      return;
    }
    const stage = el.queryStage.getBoundingClientRect();
    el.queryBox.style.left = (rect.left - stage.left + b.fx0 * rect.width) + 'px';
    el.queryBox.style.top = (rect.top - stage.top + b.fy0 * rect.height) + 'px';
    el.queryBox.style.width = ((b.fx1 - b.fx0) * rect.width) + 'px';
    el.queryBox.style.height = ((b.fy1 - b.fy0) * rect.height) + 'px';
    el.queryBox.hidden = false;
  }

  function setBox(b) {
    state.box = b;
    el.clearBox.hidden = !b;
    el.queryStage.classList.toggle('has-box', !!b);
    el.regionHint.textContent = b ? 'Searching the boxed region only.' : 'Drag on the picture to search one region of it.';
    drawBox(b);
  }

  // The upright size of the query picture: the file's is the preview's own; an indexed
  // image's preview is a thumbnail, so its original is measured (once per query).
  function pictureSize(q) {
    if (q.kind === 'file') {
      return Promise.resolve({ w: el.queryPreview.naturalWidth, h: el.queryPreview.naturalHeight });
    }
    if (!q.size) {
      q.size = new Promise((resolve, reject) => {
        const im = new Image();
        im.onload = () => resolve({ w: im.naturalWidth, h: im.naturalHeight });
        im.onerror = () => { q.size = null; reject(new Error('the original image did not load')); };
        im.src = imageUrl(q.imageId);
      });
    }
    return q.size;
  }

  async function boxParam(q) {
    const size = await pictureSize(q);
    const b = state.box;
    return [b.fx0 * size.w, b.fy0 * size.h, b.fx1 * size.w, b.fy1 * size.h].map((v) => Math.round(v)).join(',');
  }

  let drag = null;

  function dragPoint(e) {
    return { fx: clamp01((e.clientX - drag.rect.left) / drag.rect.width),
      fy: clamp01((e.clientY - drag.rect.top) / drag.rect.height) };
  }

  el.queryStage.addEventListener('pointerdown', (e) => {
    if (!state.query || (e.pointerType === 'mouse' && e.button !== 0)) return;
    const rect = pictureRect(el.queryPreview);
    if (!rect) return;
    e.preventDefault();
    try {
      el.queryStage.setPointerCapture(e.pointerId);  // the drag goes on outside the picture
    } catch (_) { /* a pointer the browser no longer tracks: the drag still works inside */ }
    drag = { id: e.pointerId, rect: rect, box: null };
    drag.start = dragPoint(e);
  });
  el.queryStage.addEventListener('pointermove', (e) => {
    if (!drag || e.pointerId !== drag.id) return;
    const p = dragPoint(e);
    drag.box = { fx0: Math.min(drag.start.fx, p.fx), fy0: Math.min(drag.start.fy, p.fy),
      fx1: Math.max(drag.start.fx, p.fx), fy1: Math.max(drag.start.fy, p.fy) };
    drawBox(drag.box);
  });
  function endDrag(e, search) {
    if (!drag || e.pointerId !== drag.id) return;
    const b = drag.box, rect = drag.rect;
    drag = null;
    if (search && b && (b.fx1 - b.fx0) * rect.width >= MIN_DRAG && (b.fy1 - b.fy0) * rect.height >= MIN_DRAG) {
      setBox(b);
      runSearch();
    } else {
      drawBox(state.box);
    }
  }
  el.queryStage.addEventListener('pointerup', (e) => endDrag(e, true));
  el.queryStage.addEventListener('pointercancel', (e) => endDrag(e, false));
  el.queryPreview.addEventListener('dragstart', (e) => e.preventDefault());
  el.queryPreview.addEventListener('load', () => drawBox(state.box));
  window.addEventListener('resize', () => {
    drawBox(state.box);
    if (state.compare && state.compare.data) drawHeatmaps();
  });
  el.clearBox.addEventListener('click', () => {
    setBox(null);
    runSearch();
  });

  // -------------------------------------------------------- why do these match?
  // The indexed image a hit can be compared with: the query when it is one (searched by id,
  // or an upload whose bytes are indexed, which then comes back among its hits).
  function comparableQuery(data, hits) {
    const q = state.query;
    if (q && q.kind === 'id') return String(q.imageId);
    const id = data.query && data.query.image_id !== undefined ? String(data.query.image_id) : null;
    return id !== null && hits.some((h) => String(h.image_id) === id) ? id : null;
  }

  function whyButton(queryId, hit) {
    const why = node('button', 'why-button', 'Why?');
    why.type = 'button';
    why.title = 'Why do these match? Compare ' + (basename(hit.path) || hit.image_id) + ' patch by patch';
    why.addEventListener('click', () => openCompare(queryId, String(hit.image_id)));
    return why;
  }

  // Low to high: viridis, readable in both colour schemes and by most colour-blind eyes.
  const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  function rampColour(t) {
    const x = clamp01(t) * (RAMP.length - 1);
    const i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
    const c = RAMP[i].map((v, k) => Math.round(v + (RAMP[i + 1][k] - v) * f));
    return 'rgba(' + c.join(',') + ',0.6)';
  }

  async function openCompare(aId, bId) {
    const seq = (state.compare ? state.compare.seq : 0) + 1;
    state.compare = { seq: seq, data: null, hover: null };
    el.compareError.hidden = true;
    el.compareSummary.textContent = 'Comparing…';
    el.comparePanels.setAttribute('aria-busy', 'true');
    for (const side of el.compareSides) {
      const canvas = side.querySelector('canvas');
      canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
      delete canvas.dataset.cells;
    }
    if (!el.compareDialog.open) el.compareDialog.showModal();
    let data;
    try {
      data = await api('/compare', new URLSearchParams({ a: aId, b: bId }));
    } catch (err) {
      if (!state.compare || state.compare.seq !== seq) return;
      el.comparePanels.setAttribute('aria-busy', 'false');
      el.compareSummary.textContent = '';
      el.compareError.textContent = describeError(err, 'Comparing');
      el.compareError.hidden = false;
      return;
    }
    if (!state.compare || state.compare.seq !== seq) return;
    await Promise.all(['a', 'b'].map((key, i) => showSide(el.compareSides[i], data[key])));
    if (!state.compare || state.compare.seq !== seq) return;
    state.compare.data = data;
    el.compareSummary.textContent = 'score ' + fmtScore(data.score) + ' (inner product ' +
      fmtScore(data.inner_product) + ') · ' + data.a.rows + '×' + data.a.cols + ' patches each · ' +
      fmtMs(data.took_ms) + ' ms';
    el.comparePanels.setAttribute('aria-busy', 'false');
    drawHeatmaps();
  }

  async function showSide(side, grid) {
    const img = side.querySelector('img');
    img.alt = basename(grid.path) || ('Image ' + grid.image_id);
    side.querySelector('figcaption').textContent = (grid.path || grid.image_id) + (grid.batch ? ' · ' + grid.batch : '');
    side.dataset.imageId = String(grid.image_id);
    img.src = imageUrl(grid.image_id, 512);
    try { await img.decode(); } catch (_) { img.classList.add('broken'); }
  }

  function similarityRange(data) {
    let lo = Infinity, hi = -Infinity;
    for (const grid of [data.a, data.b]) {
      for (const row of grid.similarity) for (const v of row) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    return hi - lo < 1e-3 ? { lo: hi - 1e-3, hi: hi } : { lo: lo, hi: hi };
  }

  // Where the picture of a side lies on its canvas (which covers the <img>), and how many of
  // the canvas's pixels one pixel of the original takes (the <img> shows a thumbnail).
  function sideGeometry(grid, img) {
    const box = img.getBoundingClientRect(), rect = pictureRect(img);
    if (!rect) return null;
    return { x: rect.left - box.left, y: rect.top - box.top, sx: rect.width / grid.width, sy: rect.height / grid.height };
  }

  // A cell of a side's grid over the part of its picture the model saw, in canvas pixels.
  function cellRect(grid, g, index) {
    const r = Math.floor(index / grid.cols), c = index % grid.cols;
    const cw = (grid.crop.x1 - grid.crop.x0) / grid.cols, ch = (grid.crop.y1 - grid.crop.y0) / grid.rows;
    return { x: g.x + (grid.crop.x0 + c * cw) * g.sx, y: g.y + (grid.crop.y0 + r * ch) * g.sy, w: cw * g.sx, h: ch * g.sy };
  }

  function drawHeatmaps() {
    const data = state.compare.data, hover = state.compare.hover;
    const range = similarityRange(data);
    el.legendLow.textContent = fmtScore(range.lo);
    el.legendHigh.textContent = fmtScore(range.hi);
    ['a', 'b'].forEach((key, i) => {
      const grid = data[key], side = el.compareSides[i];
      const img = side.querySelector('img'), canvas = side.querySelector('canvas');
      const ratio = window.devicePixelRatio || 1;
      canvas.width = Math.round(img.clientWidth * ratio);
      canvas.height = Math.round(img.clientHeight * ratio);
      const ctx = canvas.getContext('2d');
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, img.clientWidth, img.clientHeight);
      const g = sideGeometry(grid, img);
      if (!g) return;
      for (let n = 0; n < grid.rows * grid.cols; n++) {
        const cell = cellRect(grid, g, n);
        const v = grid.similarity[Math.floor(n / grid.cols)][n % grid.cols];
        ctx.fillStyle = rampColour((v - range.lo) / (range.hi - range.lo));
        ctx.fillRect(cell.x, cell.y, cell.w, cell.h);
      }
      canvas.dataset.cells = String(grid.rows * grid.cols);
      // The pointed cell, and the cell of the other image it matches.
      let outline = null;
      if (hover && hover.side === key) outline = hover.index;
      if (hover && hover.side !== key) {
        const other = data[hover.side];
        outline = other.match[Math.floor(hover.index / other.cols)][hover.index % other.cols];
      }
      if (outline !== null) {
        const cell = cellRect(grid, g, outline);
        ctx.lineWidth = 3;
        ctx.strokeStyle = hover.side === key ? '#ffffff' : '#e36209';
        ctx.strokeRect(cell.x + 1.5, cell.y + 1.5, cell.w - 3, cell.h - 3);
      }
    });
  }

  el.compareSides.forEach((side, i) => {
    const key = i === 0 ? 'a' : 'b';
    const canvas = side.querySelector('canvas');
    canvas.addEventListener('pointermove', (e) => {
      const c = state.compare;
      if (!c || !c.data) return;
      const grid = c.data[key], g = sideGeometry(grid, side.querySelector('img'));
      if (!g) return;
      const r = canvas.getBoundingClientRect();
      const x = (e.clientX - r.left - g.x) / g.sx, y = (e.clientY - r.top - g.y) / g.sy;
      const col = Math.floor((x - grid.crop.x0) / (grid.crop.x1 - grid.crop.x0) * grid.cols);
      const row = Math.floor((y - grid.crop.y0) / (grid.crop.y1 - grid.crop.y0) * grid.rows);
      const inside = row >= 0 && row < grid.rows && col >= 0 && col < grid.cols;
      const hover = inside ? { side: key, index: row * grid.cols + col } : null;
      if (JSON.stringify(hover) === JSON.stringify(c.hover)) return;
      c.hover = hover;
      drawHeatmaps();
    });
    canvas.addEventListener('pointerleave', () => {
      if (state.compare && state.compare.data && state.compare.hover) {
        state.compare.hover = null;
        drawHeatmaps();
      }
    });
  });
  $('compare-close').addEventListener('click', () => el.compareDialog.close());

  // ------------------------------------------------------------ option changes
  el.options.addEventListener('submit', (e) => e.preventDefault());
  el.k.addEventListener('change', () => { if (state.query) runSearch(); });
  el.batchFilter.addEventListener('change', (e) => {
    if (e.target && e.target.name === 'batch' && state.query) runSearch();
  });
  // A date, a size or a camera (on Enter or leaving the field) searches again at once.
  el.photoFilter.addEventListener('change', () => { if (state.query) runSearch(); });
  el.clearPhotoFilter.addEventListener('click', () => {
    const had = photoFiltered();
    el.takenFrom.value = '';
    el.takenTo.value = '';
    el.camera.value = '';
    el.minPixels.value = '';
    if (had && state.query) runSearch();
  });

  // ------------------------------------------------------------------ paging
  // Pages are asked for by number; the first load omits `page` and takes the
  // server's answer as the first page, so 0- and 1-based servers both work.
  function makePager(name, perPage, loader) {
    return {
      name: name,
      perPage: perPage,
      first: null,        // the server's number for the first page
      page: null,         // the page on screen
      total: 0,
      loaded: false,
      seq: 0,
      loader: loader,
      prev: document.getElementById(name + '-prev'),
      next: document.getElementById(name + '-next'),
      info: document.getElementById(name + '-page'),
    };
  }

  function updatePager(p, data, totalKey, noun) {
    const page = Number.isFinite(Number(data.page)) ? Number(data.page) : (p.page === null ? 1 : p.page);
    if (p.first === null) p.first = page;
    p.page = page;
    p.perPage = Number(data.per_page) || p.perPage;
    p.total = Number(data[totalKey]) || 0;
    const index = page - p.first;                         // 0-based on screen
    const pages = Math.max(1, Math.ceil(p.total / p.perPage));
    p.prev.disabled = index <= 0;
    p.next.disabled = (index + 1) * p.perPage >= p.total;
    p.info.textContent = 'Page ' + (index + 1) + ' of ' + pages + ' · ' + p.total + ' ' + noun;
    p.info.dataset.page = String(page);
  }

  function wirePager(p) {
    p.prev.addEventListener('click', () => {
      if (p.page !== null) p.loader(p.page - 1);
    });
    p.next.addEventListener('click', () => {
      if (p.page !== null) p.loader(p.page + 1);
    });
  }

  // -------------------------------------------------------------- duplicates
  function memberElement(m, extraClass) {
    const li = node('li', 'member' + (extraClass ? ' ' + extraClass : ''));
    li.dataset.imageId = String(m.image_id);
    const button = node('button', 'member-button');
    button.type = 'button';
    button.title = 'Search by this image' + (m.path ? ': ' + m.path : '');
    button.append(thumb(m.image_id, STRIP_THUMB, basename(m.path) || ('Image ' + m.image_id)));
    const path = node('span', 'path', basename(m.path) || String(m.image_id));
    path.title = m.path || '';
    button.append(path, node('span', 'batch', m.batch || ''));
    button.addEventListener('click', () => {
      setView('search');
      searchById(m.image_id, m.path, m.batch);
      window.scrollTo({ top: 0 });
    });
    li.append(button);
    return li;
  }

  // One request of a view that loads from the API (v: {seq, loaded}): its container busy
  // meanwhile. Resolves to {data} or {err}, or to null when a newer request for the same view
  // has started since (its answer is dropped).
  async function viewRequest(v, container, path, params) {
    const seq = ++v.seq;
    clearError();
    container.setAttribute('aria-busy', 'true');
    let result;
    try {
      result = { data: await api(path, params) };
    } catch (err) {
      result = { err: err };
    }
    if (seq !== v.seq) return null;
    container.setAttribute('aria-busy', 'false');
    if (!result.err) v.loaded = true;
    return result;
  }

  // One page of a paged view: its pager disabled while it loads, restored on an error; null
  // when it failed or a newer request for the same view has started since.
  async function loadPage(p, container, path, params, page, totalKey, noun, what) {
    if (page !== null && page !== undefined) params.set('page', String(page));
    params.set('per_page', String(p.perPage));
    p.prev.disabled = true;
    p.next.disabled = true;
    const result = await viewRequest(p, container, path, params);
    if (result === null) return null;
    if (result.err) {
      if (p.page !== null) {
        p.prev.disabled = p.page - p.first <= 0;
        p.next.disabled = (p.page - p.first + 1) * p.perPage >= p.total;
      }
      showError(describeError(result.err, 'Loading ' + what));
      return null;
    }
    updatePager(p, result.data, totalKey, noun);
    return result.data;
  }

  // A write of the review: JSON body, then the current page again.
  async function reviewWrite(path, body, action) {
    clearError();
    try {
      const data = await api(path, null, {
        method: 'POST', body: JSON.stringify(body), headers: { 'Content-Type': 'application/json' },
      });
      return data;
    } catch (err) {
      showError(describeError(err, action));
      return null;
    }
  }

  function metadataLine(m) {
    const parts = [];
    if (m.width && m.height) parts.push(m.width + '×' + m.height);
    if (m.captured_at) parts.push('taken ' + String(m.captured_at).replace('T', ' ').slice(0, 19));
    const camera = [m.camera_make, m.camera_model].filter(Boolean).join(' ');
    if (camera) parts.push(camera);
    if (m.bytes) parts.push(Math.round(Number(m.bytes) / 1024) + ' KiB');
    if (m.copies > 1) parts.push(m.copies + ' files');
    return parts.join(' · ');
  }

  function reviewMember(m, group) {
    const li = memberElement(m, 'review-member' + (m.suggested === 'keep' ? ' suggested-keep' : ''));
    li.dataset.decision = m.decision || '';
    li.dataset.suggested = m.suggested || '';
    const meta = node('span', 'member-meta', metadataLine(m));
    const badge = node('span', 'badge', m.suggested === 'keep' ? 'suggested: keep' : 'suggested: set aside');
    const actions = node('span', 'decision-buttons');
    for (const [action, label] of [['keep', 'Keep'], ['set_aside', 'Set aside']]) {
      const b = node('button', 'decide decide-' + action, label);
      b.type = 'button';
      b.setAttribute('aria-pressed', String(m.decision === action));
      b.addEventListener('click', async () => {
        const choice = {};
        choice[String(m.image_id)] = m.decision === action ? null : action;  // a second click undecides
        if (await reviewWrite('/duplicates/decisions', { decisions: choice }, 'Saving the decision')) {
          loadDuplicates(state.pagers.duplicates.page);
        }
      });
      actions.append(b);
    }
    const decided = node('span', 'decided-by', m.decision ? (m.decision === 'keep' ? 'kept' : 'set aside') +
      ' by ' + m.decided_by : 'undecided');
    li.append(meta, badge, actions, decided);
    // Why is this one in the group? Compared patch by patch with the copy suggested to keep.
    const keeper = (group.members || []).find((k) => k.suggested === 'keep');
    if (keeper && String(keeper.image_id) !== String(m.image_id)) li.append(whyButton(String(keeper.image_id), m));
    return li;
  }

  async function loadDuplicates(page) {
    const params = new URLSearchParams();
    const minScore = $('review-min-score');
    if (minScore && minScore.dataset.filter === 'on' && minScore.value) params.set('min_score', minScore.value);
    const data = await loadPage(state.pagers.duplicates, el.duplicates, '/duplicates', params, page,
      'total_groups', 'groups', 'duplicates');
    if (data === null) return;
    loadPlan();

    const groups = Array.isArray(data.groups) ? data.groups : [];
    if (!groups.length) {
      el.duplicates.replaceChildren(node('p', 'hint empty', 'No duplicate groups.'));
      return;
    }
    el.duplicates.replaceChildren(...groups.map((g) => {
      const members = Array.isArray(g.members) ? g.members : [];
      const size = g.size !== undefined && g.size !== null ? Number(g.size) : members.length;
      const art = node('article', 'group');
      art.dataset.size = String(size);
      if (g.group !== undefined && g.group !== null) art.dataset.group = String(g.group);
      const head = node('header', 'row-header');
      head.append(
        node('h3', 'row-title', 'Group ' + (g.group !== undefined && g.group !== null ? g.group : '')),
        node('span', 'group-size', size + (size === 1 ? ' image' : ' images')),
      );
      if (g.score !== undefined && g.score !== null) {
        head.append(node('span', 'group-score', 'every pair ≥ ' + fmtScore(g.score)));
      }
      if (g.max_similarity !== undefined && g.max_similarity !== null) {
        const sim = node('span', 'group-similarity', 'max similarity ' + fmtScore(g.max_similarity));
        sim.dataset.maxSimilarity = String(g.max_similarity);
        head.append(sim);
      }
      const apart = node('button', 'not-duplicates', 'Not duplicates');
      apart.type = 'button';
      apart.title = 'These images are not copies of each other: never group them again';
      apart.addEventListener('click', async () => {
        if (await reviewWrite('/duplicates/separate', { image_ids: members.map((m) => String(m.image_id)) },
          'Separating the group')) loadDuplicates(state.pagers.duplicates.page);
      });
      head.append(apart);
      const strip = node('ul', 'strip members side-by-side');
      strip.append(...members.map((m) => reviewMember(m, g)));
      art.append(head, strip);
      return art;
    }));
  }

  async function loadPlan() {
    const info = $('review-plan');
    if (!info) return;
    try {
      const plan = await api('/duplicates/plan');
      const applies = await api('/duplicates/applies');
      info.textContent = plan.files + (plan.files === 1 ? ' file' : ' files') + ' set aside, not yet moved';
      info.dataset.files = String(plan.files);
      $('review-apply').disabled = !plan.files;
      const last = (applies.applies || []).find((a) => a.state !== 'undone');
      const undo = $('review-undo');
      undo.disabled = !last;
      undo.dataset.applyId = last ? last.apply_id : '';
    } catch (err) {
      showError(describeError(err, 'Loading the plan'));
    }
  }

  function wireReview() {
    const minScore = $('review-min-score');
    $('review-accept').addEventListener('click', async () => {
      const s = Number(minScore.value);
      if (!Number.isFinite(s)) return;
      const done = await reviewWrite('/duplicates/accept', { min_score: s }, 'Accepting the suggestions');
      if (done) {
        $('review-status').textContent = 'Accepted the suggestion for ' + done.groups + ' groups (' + done.decided +
          ' images decided).';
        loadDuplicates(state.pagers.duplicates.page);
      }
    });
    $('review-filter').addEventListener('change', (e) => {
      minScore.dataset.filter = e.target.checked ? 'on' : 'off';
      state.pagers.duplicates.first = null;
      loadDuplicates(1);
    });
    $('review-apply').addEventListener('click', async () => {
      const done = await reviewWrite('/duplicates/apply', {}, 'Moving the set-aside files');
      if (done) {
        $('review-status').textContent = 'Moved ' + done.moved + ' files to set-aside/ (apply ' + done.apply_id + ')' +
          (done.failed.length ? '; ' + done.failed.length + ' could not move' : '') + '.';
        loadDuplicates(state.pagers.duplicates.page);
      }
    });
    $('review-undo').addEventListener('click', async (e) => {
      const id = e.target.dataset.applyId;
      if (!id) return;
      const done = await reviewWrite('/duplicates/undo', { apply_id: id }, 'Undoing the apply');
      if (done) {
        $('review-status').textContent = 'Put back ' + done.undone.map((u) => u.restored).reduce((a, b) => a + b, 0) +
          ' files (apply ' + id + ').';
        loadDuplicates(state.pagers.duplicates.page);
      }
    });
    for (const kind of ['csv', 'json']) {
      const link = $('review-export-' + kind);
      link.href = '/duplicates/export?' + withToken(new URLSearchParams({ format: kind })).toString();
    }
  }

  // ---------------------------------------------------------------- clusters
  async function loadClusters(page) {
    const data = await loadPage(state.pagers.clusters, el.clusters, '/clusters',
      new URLSearchParams({ samples: String(CLU_SAMPLES) }), page, 'total_clusters', 'clusters', 'clusters');
    if (data === null) return;

    const clusters = Array.isArray(data.clusters) ? data.clusters : [];
    if (!clusters.length) {
      el.clusters.replaceChildren(node('p', 'hint empty', 'No clusters.'));
      return;
    }
    el.clusters.replaceChildren(...clusters.map((c) => {
      const samples = Array.isArray(c.samples) ? c.samples : [];
      const size = c.size !== undefined && c.size !== null ? Number(c.size) : samples.length;
      const art = node('article', 'cluster');
      art.dataset.size = String(size);
      if (c.cluster !== undefined && c.cluster !== null) art.dataset.cluster = String(c.cluster);
      const head = node('header', 'row-header');
      head.append(
        node('h3', 'row-title', 'Cluster ' + (c.cluster !== undefined && c.cluster !== null ? c.cluster : '')),
        node('span', 'cluster-size', size + (size === 1 ? ' image' : ' images')),
      );
      const strip = node('ul', 'strip samples');
      strip.append(...samples.map((m) => memberElement(m, 'sample')));
      art.append(head, strip);
      return art;
    }));
  }

  // ----------------------------------------------------------------- quality
  const QUALITY_COLUMNS = [
    ['family', 'Edit family'],
    ['copies', 'Copies'],
    ['recall_at_1', 'Recall@1'],
    ['recall_at_10', 'Recall@10'],
    ['mean_average_precision', 'mAP'],
    ['median_copy_score', 'Median copy score'],
    ['median_nearest_non_copy', 'Median nearest non-copy'],
  ];

  function plural(n, one, many) {
    return n + ' ' + (Number(n) === 1 ? one : many);
  }

  // A table inside a box that scrolls sideways, so a narrow window keeps its width.
  function scrollingTable(className, label, columns, rows, rowElement) {
    const table = node('table', 'data-table ' + className);
    const headRow = node('tr');
    headRow.append(...columns.map(([key, title]) => {
      const th = node('th', key === columns[0][0] ? null : 'num', title);
      th.scope = 'col';
      return th;
    }));
    const head = node('thead');
    head.append(headRow);
    const body = node('tbody');
    body.append(...rows.map(rowElement));
    table.append(head, body);
    const box = node('div', 'table-scroll');
    box.setAttribute('role', 'region');
    box.setAttribute('aria-label', label);
    box.tabIndex = 0;  // scrollable by keyboard
    box.append(table);
    return box;
  }

  function tableRow(first, cells) {
    const tr = node('tr');
    const th = node('th', null, first);
    th.scope = 'row';
    tr.append(th, ...cells.map((c) => node('td', 'num', c)));
    return tr;
  }

  function fact(term, value, note) {
    const div = node('div');
    const dd = node('dd', null, value);
    if (note) dd.append(' ', node('span', 'hint', note));
    div.append(node('dt', null, term), dd);
    return div;
  }

  async function loadQuality() {
    const result = await viewRequest(state.quality, el.quality, '/evaluation');
    if (result === null) return;
    if (result.err) {
      el.qualityRandom.hidden = true;
      el.qualitySummary.textContent = '';
      if (result.err.status === 404 && result.err.code === 'not_evaluated') {
        const p = node('p', 'note not-evaluated', 'Not evaluated yet: run ');
        p.append(node('code', null, 'imgsim evaluate'), ' (or ', node('code', null, 'imgsim ingest'),
          ', which evaluates a new index).');
        el.quality.replaceChildren(p);
      } else {
        el.quality.replaceChildren();
        showError(describeError(result.err, 'Loading the evaluation'));
      }
      return;
    }
    renderQuality(result.data);
  }

  function renderQuality(d) {
    const rows = Array.isArray(d.table) ? d.table : [];
    const all = rows.find((r) => r.family === 'all') || {};
    el.qualityRandom.hidden = d.random_weights !== true;
    el.qualitySummary.textContent = plural(all.copies, 'edited copy', 'edited copies') + ' of ' +
      plural(d.sources, 'image', 'images') + ' searched · ' +
      plural(rows.filter((r) => r.family !== 'all').length, 'edit family', 'edit families');

    const families = scrollingTable('families', 'Results by edit family', QUALITY_COLUMNS, rows, (r) => {
      const tr = tableRow(r.family, QUALITY_COLUMNS.slice(1).map(([key]) =>
        key === 'copies' ? String(r.copies) : fmtScore(r[key])));
      tr.dataset.family = String(r.family);
      if (r.family === 'all') tr.className = 'total';
      return tr;
    });

    const t = d.threshold || {};
    const threshold = node('section', 'quality-card threshold');
    const facts = node('dl', 'facts');
    const target = fact('Target precision', fmtScore(d.target_precision),
      t.reached === true ? 'reached' : 'not reached: the threshold is just above the best non-copy');
    target.className = t.reached === true ? 'reached' : 'not-reached';
    const value = fact('Similarity ≥', fmtScore(t.value), '(inner product in the index)');
    value.lastChild.title = String(t.value);  // three decimals may round it to 1.000
    facts.append(
      value,
      fact('Precision', fmtScore(t.precision)),
      fact('Recall', fmtScore(t.recall)),
      target,
      fact('Held-out precision', fmtScore(d.held_out_precision), '(calibrated on the other half of the images)'),
      fact('Held-out recall', fmtScore(d.held_out_recall)),
    );
    threshold.append(node('h3', 'row-title', 'Duplicate threshold'), facts);

    const groupings = Array.isArray(d.groupings) ? d.groupings : [];
    const grouping = node('section', 'quality-card grouping');
    grouping.append(
      node('h3', 'row-title', 'Grouping rule'),
      node('p', 'hint', 'Copies and their originals grouped at the threshold, scored against the planted groups ' +
        '(B-cubed). The best F1 is chosen for near-duplicate groups.'),
      scrollingTable('groupings', 'Grouping rules',
        [['rule', 'Rule'], ['purity', 'Purity'], ['completeness', 'Completeness'], ['f1', 'F1']], groupings, (g) => {
          const chosen = g.rule === d.grouping;
          const tr = tableRow(g.rule, [fmtScore(g.purity), fmtScore(g.completeness), fmtScore(g.f1)]);
          tr.dataset.rule = String(g.rule);
          if (chosen) {
            tr.className = 'chosen';
            tr.firstChild.append(' ', node('span', 'badge', 'chosen'));
          }
          return tr;
        }),
    );

    const settings = d.settings || {};
    const skipped = Array.isArray(d.skipped) ? d.skipped.length : 0;
    const notes = node('p', 'hint', [
      'seed ' + (settings.seed !== undefined ? settings.seed : '?'),
      'top ' + (settings.k !== undefined ? settings.k : '?') + ' results per copy',
      plural(d.unlabelled || 0, 'result', 'results') + ' left unlabelled (possible duplicates already held)',
      skipped + ' skipped (unreadable or rejected)',
      fmtMs(d.embed_ms_per_copy) + ' ms to embed a copy',
    ].join(' · '));

    el.quality.replaceChildren(families, threshold, grouping, notes);
  }

  // ----------------------------------------------------------------- routing
  function viewFromHash() {
    const raw = window.location.hash.replace(/^#/, '').split(/[/?&]/)[0].toLowerCase();
    return VIEWS.includes(raw) ? raw : 'search';
  }

  function setView(view) {
    // Switch at once (so a later hashchange finds nothing to change and
    // clears no error raised meanwhile), then record the view in the URL.
    showView(view, false);
    if (window.location.hash !== '#' + view) window.location.hash = view;
  }

  function showView(view, moveFocus) {
    const changed = state.view !== view;
    state.view = view;
    for (const v of VIEWS) {
      const section = document.getElementById('view-' + v);
      section.hidden = v !== view;
      const tab = document.getElementById('tab-' + v);
      if (v === view) tab.setAttribute('aria-current', 'page');
      else tab.removeAttribute('aria-current');
    }
    document.body.dataset.view = view;
    document.title = 'imgsim — ' + view;
    if (changed) clearError();
    const lazy = state.pagers[view] || (view === 'quality' ? state.quality : null);
    if (lazy && !lazy.loaded) lazy.loader(null);
    if (moveFocus) {
      const heading = document.getElementById(view + '-heading');
      if (heading) {
        heading.setAttribute('tabindex', '-1');
        heading.focus({ preventScroll: true });
      }
    }
  }

  window.addEventListener('hashchange', () => showView(viewFromHash(), true));

  // -------------------------------------------------------------------- boot
  wirePager(state.pagers.duplicates);
  wireReview();
  wirePager(state.pagers.clusters);
  el.queryPreview.addEventListener('error', () => el.queryPreview.classList.add('broken'));
  state.view = null;
  showView(viewFromHash(), false);
  loadHealth();
  loadBatches();
})();
