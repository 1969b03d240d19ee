// qloc report: the per-fact explorer. It reads the JSON embedded beside it and draws one fact at a
// time (a run can have thousands). Text from the data reaches the page only through text nodes
// and textContent, never as HTML.
(function () {
  'use strict';
  const root = document.getElementById('qloc-explorer');
  const data = JSON.parse(document.getElementById('qloc-explorer-data').textContent);
  const MAX_OPTIONS = 200;   // options listed at once; the search box narrows the rest
  const KNOWN_RANK = 10;     // as the report's findings: answer in the model's top 10
  const SET_NAMES = {self: 'Self', union: 'Union', cas: 'CAS', intersection: 'Intersection',
                     refine: 'Refine', unrelated: 'Unrelated'};

  // -- small helpers ------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === 'text') node.textContent = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(typeof child === 'string' ? document.createTextNode(child) : child);
      }
    }
    return node;
  }

  // The report's number format (qloc.report_format.format_number), so the explorer and the
  // tables write the same number the same way.
  function fmt(x) {
    if (x === null || x === undefined || Number.isNaN(x)) return '–';
    if (x === 0) return '0';
    const magnitude = Math.abs(x);
    if (magnitude < 1e-3 || magnitude >= 1e6) {
      let exponent = Math.floor(Math.log10(magnitude));
      let mantissa = x / Math.pow(10, exponent);
      if (Math.abs(Number(mantissa.toPrecision(2))) >= 10) { mantissa /= 10; exponent += 1; }
      return `${Number(mantissa.toPrecision(2))}×10^${exponent}`;
    }
    if (Number.isInteger(x)) return x.toLocaleString('en-US');
    const digits = magnitude < 10 ? 3 : magnitude < 1000 ? 2 : 0;
    return x.toLocaleString('en-US', {minimumFractionDigits: digits, maximumFractionDigits: digits});
  }

  function table(headers, rows) {
    const head = el('tr', {}, ...headers.map(h => el('th', {text: h})));
    const body = rows.map(cells => el('tr', {}, ...cells.map(cell => {
      if (cell instanceof Node) return el('td', {}, cell);
      if (typeof cell === 'number' || cell === null) return el('td', {text: fmt(cell)});
      return el('td', {class: 'text', text: String(cell)});
    })));
    return el('div', {class: 'table'}, el('table', {}, el('thead', {}, head), el('tbody', {}, ...body)));
  }

  // A canvas sized in CSS pixels and drawn at the screen's resolution.
  function canvas(kind, width, height) {
    const node = el('canvas', {dataset: {kind: kind}});
    const ratio = window.devicePixelRatio || 1;
    node.width = Math.round(width * ratio);
    node.height = Math.round(height * ratio);
    node.style.width = `${width}px`;
    node.style.height = `${height}px`;
    const context = node.getContext('2d');
    context.scale(ratio, ratio);
    context.fillStyle = '#fff';
    context.fillRect(0, 0, width, height);
    return [node, context];
  }

  function pointer(node, event) {
    const box = node.getBoundingClientRect();
    return [(event.clientX - box.left) * (parseFloat(node.style.width) / box.width),
            (event.clientY - box.top) * (parseFloat(node.style.height) / box.height)];
  }

  // White to dark blue for 0..1.
  function blue(value) {
    const v = Math.max(0, Math.min(1, value));
    return `rgb(${Math.round(255 - 247 * v)},${Math.round(255 - 207 * v)},${Math.round(255 - 148 * v)})`;
  }

  // Blue (negative) through white to red (positive), for -limit..limit.
  function diverging(value, limit) {
    const v = Math.max(-1, Math.min(1, value / (limit || 1)));
    if (v >= 0) return `rgb(255,${Math.round(255 - 200 * v)},${Math.round(255 - 210 * v)})`;
    return `rgb(${Math.round(255 + 210 * v)},${Math.round(255 + 150 * v)},255)`;
  }

  // KN sets arrive as neuron indices, layer * width + neuron (see qloc.report_explorer).
  const layerOf = index => Math.floor(index / run.width);
  const neuronOf = index => index % run.width;

  function jaccard(a, b) {
    if (!a.length && !b.length) return null;
    const seen = new Set(a);
    const shared = b.filter(index => seen.has(index)).length;
    const union = a.length + b.length - shared;
    return {value: shared / union, shared: shared, union: union};
  }

  // -- the picker -------------------------------------------------------------------------------
  // The method whose KN sets the edits, mapping and synapse experiments used, where they ran.
  function preferredMethod(r) {
    const edited = r.facts.find(f => f.edits || f.mapping);
    return edited ? (edited.edits || edited.mapping).method : r.methods[0];
  }

  let run = data.runs[0];
  let matching = [];
  let current = null;
  let method = preferredMethod(run);
  const haystacks = new Map();

  function haystack(fact) {
    if (!haystacks.has(fact)) {
      haystacks.set(fact, [fact.id, fact.relation, fact.object, ...fact.queries.map(q => q[0])]
        .join('\n').toLowerCase());
    }
    return haystacks.get(fact);
  }

  const runSelect = el('select', {'aria-label': 'run'},
    ...data.runs.map((r, k) => el('option', {value: String(k), text: `${r.model} (${r.label})`})));
  const search = el('input', {type: 'search', placeholder: 'search: fact id, relation, answer or prompt',
                              'aria-label': 'search facts'});
  const list = el('select', {size: '8', 'aria-label': 'facts'});
  const count = el('span', {class: 'note'});
  const previous = el('button', {type: 'button', text: '◀ previous'});
  const next = el('button', {type: 'button', text: 'next ▶'});
  const view = el('div', {class: 'fact'});
  root.append(el('div', {class: 'picker'},
    data.runs.length > 1 ? runSelect : null,
    el('div', {}, search, el('br'), count, el('br'), previous, ' ', next),
    list), view);

  function classOf(fact) {
    const score = fact.cs[method] || fact.cs[Object.keys(fact.cs)[0]];
    return score ? score.static : '';
  }

  function refresh() {
    const needle = search.value.trim().toLowerCase();
    matching = run.facts.map((f, k) => k).filter(k => !needle || haystack(run.facts[k]).includes(needle));
    list.replaceChildren(...matching.slice(0, MAX_OPTIONS).map(k => {
      const f = run.facts[k];
      return el('option', {value: String(k), text: `${f.id} · ${f.relation} · ${f.object} · ${classOf(f)}`});
    }));
    const total = run.facts.length.toLocaleString('en-US');
    count.textContent = `${matching.length.toLocaleString('en-US')} of ${total} facts match` +
      (matching.length > MAX_OPTIONS ? `; the first ${MAX_OPTIONS} are listed` : '');
    if (current !== null) list.value = String(current);
  }

  function step(offset) {
    if (!matching.length) return;
    const at = matching.indexOf(current);
    const target = at < 0 ? 0 : Math.max(0, Math.min(matching.length - 1, at + offset));
    show(matching[target]);
  }

  runSelect.addEventListener('change', () => {
    run = data.runs[Number(runSelect.value)];
    method = preferredMethod(run);
    current = null;
    refresh();
    show(0);
  });
  search.addEventListener('input', refresh);
  search.addEventListener('keydown', event => {
    if (event.key === 'Enter' && matching.length) show(matching[0]);
  });
  list.addEventListener('change', () => show(Number(list.value)));
  previous.addEventListener('click', () => step(-1));
  next.addEventListener('click', () => step(1));

  // -- one fact -------------------------------------------------------------------------------
  function show(index) {
    current = index;
    const fact = run.facts[index];
    if (!fact.kn[method]) method = Object.keys(fact.kn)[0];
    list.value = String(index);
    view.replaceChildren(...render(fact));
    root.dataset.fact = fact.id;
    root.dataset.queries = String(fact.queries.length);
  }

  function render(fact) {
    const parts = [];
    const badges = Object.entries(fact.cs).map(([m, s]) =>
      el('span', {class: `badge ${s.static}`, text: `${m.toUpperCase()} ${s.static}`}));
    parts.push(el('h3', {}, `Fact ${fact.id}`,
      el('span', {class: 'note', text: ` relation ${fact.relation}, answer `}), el('b', {text: fact.object}),
      ...badges));
    const methods = Object.keys(fact.kn);
    if (methods.length > 1) {
      const chooser = el('select', {'aria-label': 'attribution method'},
        ...methods.map(m => el('option', {value: m, text: m.toUpperCase()})));
      chooser.value = method;
      chooser.addEventListener('change', () => { method = chooser.value; show(current); });
      parts.push(el('p', {}, 'KN sets of ', chooser,
        ' (the method whose sets the strip and the overlap show)'));
    }
    const sets = fact.kn[method];
    const score = fact.cs[method];
    parts.push(el('p', {class: 'context', text:
      `CS ${fmt(score.cs)} (strict ${fmt(score.strict)}): ${score.static} under the static threshold ` +
      `${run.static_threshold}, ${score.otsu} under Otsu's threshold ${fmt(score.otsu_threshold)} ` +
      'of this run.'}));
    parts.push(el('h4', {text: 'Queries'}));
    parts.push(table(['query', 'prompt', 'P(answer)', 'rank', `KNs (${method.toUpperCase()})`],
      fact.queries.map((q, k) => [`q${k}`, q[0], q[1],
        el('span', {class: q[2] < KNOWN_RANK ? 'known' : '', text: q[2].toLocaleString('en-US')}),
        sets[k] ? sets[k].length : null])));
    parts.push(el('p', {class: 'note', text: 'rank 0: the model\'s first choice is the answer ' +
      `(first token); green: the answer is in its top ${KNOWN_RANK}.`}));
    parts.push(el('h4', {text: 'KN sets over layers and neurons'}));
    parts.push(strip(fact, sets));
    parts.push(el('h4', {text: 'Overlap of the queries\' KN sets (Jaccard index)'}));
    parts.push(overlap(sets));
    if (fact.edits) parts.push(...edits(fact.edits));
    if (fact.mapping) parts.push(...mapping(fact.mapping));
    if (fact.synapses) parts.push(...synapses(fact));
    return parts;
  }

  // Each query's KN set as marks on one line from layer 0, neuron 0 to the last layer's last
  // neuron; dark marks are held by two or more queries (the overlap CS counts), orange by one.
  function strip(fact, sets) {
    const cas = fact.cas[method];
    const rows = sets.map((s, k) => [`q${k}`, s]).concat(cas ? [['CAS', cas]] : []);
    const label = 44, rowHeight = 16, width = Math.min(1150, Math.max(600, root.clientWidth - 40));
    const plot = width - label - 8;
    const height = rows.length * rowHeight + 22;
    const [node, context] = canvas('strip', width, height);
    const counts = new Map();
    sets.forEach(s => s.forEach(index => counts.set(index, (counts.get(index) || 0) + 1)));
    const x = index => label + (index / (run.layers * run.width)) * plot;
    context.font = '11px system-ui, sans-serif';
    for (let layer = 0; layer <= run.layers; layer++) {
      const at = label + (layer / run.layers) * plot;
      context.fillStyle = layer % 5 === 0 ? '#bbb' : '#eee';
      context.fillRect(at, 0, 1, rows.length * rowHeight);
      if (layer % 5 === 0 && layer < run.layers) {
        context.fillStyle = '#555';
        context.fillText(`L${layer}`, at + 2, rows.length * rowHeight + 14);
      }
    }
    rows.forEach(([name, set], r) => {
      const top = r * rowHeight;
      context.fillStyle = '#333';
      context.fillText(name, 4, top + 12);
      for (const index of set) {
        context.fillStyle = name === 'CAS' ? '#2a7f3f' : (counts.get(index) > 1 ? '#1f4e99' : '#e67e22');
        context.fillRect(x(index) - 1, top + 2, 2.5, rowHeight - 4);
      }
    });
    const hover = el('div', {class: 'hover'});
    node.addEventListener('mousemove', event => {
      const [px, py] = pointer(node, event);
      const row = rows[Math.floor(py / rowHeight)];
      if (!row) { hover.textContent = ''; return; }
      const near = row[1].filter(index => Math.abs(x(index) - px) <= 3);
      hover.textContent = near.length ? `${row[0]}: ` + near.map(index => `layer ${layerOf(index)}, neuron ` +
        `${neuronOf(index)} (in ${counts.get(index) || 0} of ${sets.length} queries' sets)`).join('; ')
        : `${row[0]}: ${row[1].length} neurons`;
    });
    const legend = el('p', {class: 'note', text: `${run.layers} layers × ` +
      `${run.width.toLocaleString('en-US')} neurons, layer by layer from the left. Dark: in two or more ` +
      'queries\' sets; orange: in one query\'s set only; green: the fact\'s Consistency-Aware (CAS) set. ' +
      'Point at a mark for its neuron.'});
    return el('div', {}, node, hover, legend);
  }

  function overlap(sets) {
    const n = sets.length;
    const cell = Math.max(16, Math.min(44, Math.floor(360 / n)));
    const margin = 36;
    const size = margin + n * cell + 4;
    const [node, context] = canvas('overlap', size, size);
    const values = sets.map(a => sets.map(b => jaccard(a, b)));
    context.font = '11px system-ui, sans-serif';
    context.textAlign = 'center';
    context.textBaseline = 'middle';
    let drawn = 0;
    for (let i = 0; i < n; i++) {
      context.fillStyle = '#333';
      context.fillText(`q${i}`, margin / 2, margin + i * cell + cell / 2);
      context.fillText(`q${i}`, margin + i * cell + cell / 2, margin / 2);
      for (let j = 0; j < n; j++) {
        const v = values[i][j];
        context.fillStyle = v === null ? '#ccc' : blue(v.value);
        context.fillRect(margin + j * cell, margin + i * cell, cell - 1, cell - 1);
        drawn += 1;
        if (cell >= 28) {
          context.fillStyle = v !== null && v.value > 0.5 ? '#fff' : '#222';
          context.fillText(v === null ? '–' : v.value.toFixed(2), margin + j * cell + cell / 2,
                           margin + i * cell + cell / 2);
        }
      }
    }
    root.dataset.overlapCells = String(drawn);
    const hover = el('div', {class: 'hover'});
    node.addEventListener('mousemove', event => {
      const [px, py] = pointer(node, event);
      const i = Math.floor((py - margin) / cell), j = Math.floor((px - margin) / cell);
      if (i < 0 || j < 0 || i >= n || j >= n) { hover.textContent = ''; return; }
      const v = values[i][j];
      hover.textContent = v === null ? `q${i} and q${j}: both KN sets are empty` :
        `q${i} and q${j}: ${v.shared} shared of ${v.union} neurons, Jaccard ${fmt(v.value)}`;
    });
    const pairs = [];
    for (let i = 0; i < n; i++) {
      for (let j = i + 1; j < n; j++) if (values[i][j]) pairs.push(values[i][j].value);
    }
    const mean = pairs.length ? pairs.reduce((a, b) => a + b, 0) / pairs.length : null;
    return el('div', {}, node, hover, el('p', {class: 'note', text:
      `Shared neurons / neurons in either set, for each pair of queries (mean over pairs ${fmt(mean)}). ` +
      'Dark off-diagonal cells: queries that share their KNs, as the KL assumption expects of every fact.'}));
  }

  // Columns of an edit that newer stores add (probabilities of the old and new answer on the edited
  // query, KNs dropped by a shared-neuron filter); shown where the run has them.
  const EDIT_EXTRAS = {prob_before: 'P(o) before', prob_after: 'P(o) after', new_prob_before: 'P(o\') before',
                       new_prob_after: 'P(o\') after', kn_dropped: 'KNs dropped'};

  function edits(found) {
    const present = c => found.rows.some(r => r[c] !== undefined && r[c] !== null);
    const extras = Object.keys(EDIT_EXTRAS).filter(present);
    const rows = found.rows.map(r => [r.mode, SET_NAMES[r.kn_set] || r.kn_set, r.kn_size,
      r.new_object === null || r.new_object === undefined ? '–' : r.new_object, r.rel, r.gen, r.loc, r.avg,
      r.dppl, ...extras.map(c => r[c] ?? null)]);
    const headers = ['mode', 'KN set', 'KNs', 'new answer', 'Rel', 'Gen', 'Loc', 'Avg', 'dPPL',
      ...extras.map(c => EDIT_EXTRAS[c])];
    const view = table(headers, rows);
    view.querySelectorAll('tbody tr').forEach((tr, k) => {
      if (found.rows[k].dppl > 1) {
        const cell = tr.children[headers.indexOf('dPPL')];
        cell.className = 'flag';
        cell.title = 'perplexity more than doubled: a broken edit';
      }
    });
    return [el('h4', {text: `Edits (${found.method.toUpperCase()} KN sets)`}), view,
      el('p', {class: 'note', text: 'Rel, Gen, Loc, Avg: 0-1, higher is better; dPPL: relative change of ' +
        'WikiText-2 perplexity (1 = doubled; marked above 1). o: the fact\'s answer; o\': the update\'s.'})];
  }

  function mapping(found) {
    const operations = Object.keys(found.dprob);
    const sets = Object.keys(found.dprob[operations[0]]);
    return [el('h4', {text: `Query-KN mapping (${found.method.toUpperCase()} KN sets)`}),
      table(['KN set', ...operations.map(o => `dProb, ${o}`)],
        sets.map(s => [SET_NAMES[s] || s, ...operations.map(o => found.dprob[o][s])])),
      el('p', {class: 'note', text: 'Mean over the fact\'s queries of the relative change of P(answer) ' +
        'when the set is suppressed (x0) or enhanced (x2).'})];
  }

  // Figure 5 for this fact: activations of the fact's KNs (columns) at each query (rows), with
  // no manipulation, the query's knowledge synapses suppressed, and enhanced; then one query's
  // synapses on a grid of (attending position, attended position).
  function synapses(fact) {
    const found = fact.synapses;
    const operations = ['none', 'suppress', 'enhance'];
    const queries = found.queries.filter(q => q.heat.none);
    const parts = [el('h4', {text: 'Knowledge synapses and KN activations'})];
    parts.push(table(['query', 'synapses', 'dProb, suppress', 'dProb, enhance'],
      found.queries.map(q => [`q${q.index}`, q.count, q.dprob.suppress ?? null, q.dprob.enhance ?? null])));
    if (queries.length && found.neurons.length) {
      const columns = found.neurons.length;
      const cellWidth = Math.max(3, Math.min(10, Math.floor(340 / columns)));
      const rowHeight = 14, label = 30, gap = 16;
      const panelWidth = columns * cellWidth;
      const width = label + 3 * panelWidth + 2 * gap + 4, height = 18 + queries.length * rowHeight + 4;
      const [node, context] = canvas('heatmap', width, height);
      // The colour scale ends at the 95th percentile of |activation|: a few massive activations
      // would otherwise leave every other cell white. Larger values are saturated.
      const magnitudes = [];
      queries.forEach(q => operations.forEach(o => (q.heat[o] || []).forEach(v => {
        if (v !== null) magnitudes.push(Math.abs(v));
      })));
      magnitudes.sort((a, b) => a - b);
      const limit = magnitudes.length ? magnitudes[Math.floor(0.95 * (magnitudes.length - 1))] : 1;
      context.font = '11px system-ui, sans-serif';
      operations.forEach((o, panel) => {
        const left = label + panel * (panelWidth + gap);
        context.fillStyle = '#333';
        const title = {none: 'no manipulation', suppress: 'KS suppressed', enhance: 'KS enhanced'}[o];
        context.fillText(title, left, 12);
        queries.forEach((q, r) => (q.heat[o] || []).forEach((v, c) => {
          context.fillStyle = v === null ? '#ccc' : diverging(v, limit);
          context.fillRect(left + c * cellWidth, 18 + r * rowHeight, cellWidth, rowHeight - 1);
        }));
      });
      context.fillStyle = '#333';
      queries.forEach((q, r) => context.fillText(`q${q.index}`, 2, 29 + r * rowHeight));
      const hover = el('div', {class: 'hover'});
      node.addEventListener('mousemove', event => {
        const [px, py] = pointer(node, event);
        const r = Math.floor((py - 18) / rowHeight);
        const offset = px - label, panel = Math.floor(offset / (panelWidth + gap));
        const c = Math.floor((offset - panel * (panelWidth + gap)) / cellWidth);
        if (r < 0 || r >= queries.length || panel < 0 || panel > 2 || c < 0 || c >= columns) {
          hover.textContent = '';
          return;
        }
        const q = queries[r], neuron = found.neurons[c];
        hover.textContent = `q${q.index}, layer ${neuron[0]} neuron ${neuron[1]}: ` +
          operations.map(o => `${o} ${fmt(q.heat[o] ? q.heat[o][c] : null)}`).join(', ');
      });
      parts.push(node, hover, el('p', {class: 'note', text: `Activations of the fact's ${columns} most ` +
        'shared KNs ' +
        `(layer by layer); red positive, blue negative, full colour at ±${fmt(limit)} (95th percentile of ` +
        '|activation|; larger values saturate). Point at a cell for its values.'}));
    }
    const withSynapses = found.queries.filter(q => q.synapses.length);
    if (withSynapses.length) {
      const chooser = el('select', {'aria-label': 'query whose synapses are drawn'},
        ...withSynapses.map(q => el('option', {value: String(q.index), text: `q${q.index}`})));
      const holder = el('div', {});
      const draw = () => holder.replaceChildren(
        synapseMap(withSynapses.find(q => String(q.index) === chooser.value)));
      chooser.addEventListener('change', draw);
      draw();
      parts.push(el('p', {}, 'Knowledge synapses of query ', chooser), holder);
    }
    return parts;
  }

  function synapseMap(query) {
    const size = 1 + Math.max(...query.synapses.map(s => Math.max(s[2], s[3])));
    const cell = Math.max(10, Math.min(28, Math.floor(300 / size)));
    const margin = 34;
    const [node, context] = canvas('synapse-map', margin + size * cell + 4, margin + size * cell + 4);
    const totals = new Map();
    query.synapses.forEach(s => totals.set(`${s[2]}:${s[3]}`, (totals.get(`${s[2]}:${s[3]}`) || 0) + s[4]));
    const peak = Math.max(...totals.values());
    context.font = '10px system-ui, sans-serif';
    context.textAlign = 'center';
    context.textBaseline = 'middle';
    for (let i = 0; i < size; i++) {
      context.fillStyle = '#333';
      context.fillText(String(i), margin / 2, margin + i * cell + cell / 2);
      context.fillText(String(i), margin + i * cell + cell / 2, margin / 2);
      for (let j = 0; j <= i; j++) {
        const total = totals.get(`${i}:${j}`);
        context.fillStyle = total ? blue(0.15 + 0.85 * total / peak) : '#f4f4f4';
        context.fillRect(margin + j * cell, margin + i * cell, cell - 1, cell - 1);
      }
    }
    const hover = el('div', {class: 'hover'});
    node.addEventListener('mousemove', event => {
      const [px, py] = pointer(node, event);
      const i = Math.floor((py - margin) / cell), j = Math.floor((px - margin) / cell);
      const here = query.synapses.filter(s => s[2] === i && s[3] === j);
      hover.textContent = here.length ? `position ${i} attends to ${j}: ` +
        here.map(s => `layer ${s[0]} head ${s[1]} score ${fmt(s[4])}`).join('; ') : '';
    });
    const shown = query.synapses.length < query.count
      ? ` (the ${query.synapses.length} strongest of ${query.count})` : '';
    return el('div', {}, node, hover, el('p', {class: 'note', text: 'Rows: attending token position; ' +
      'columns: attended position (prompt tokens from 0). Shade: summed IG score of the synapses' +
      `${shown} over layers ` +
      'and heads; point at a cell for them.'}));
  }

  refresh();
  if (run.facts.length) show(0);
})();
