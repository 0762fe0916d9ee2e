
(() => {
  const sort = document.getElementById('mps-sort');
  const filter = document.getElementById('mps-filter');
  const count = document.getElementById('mps-count');
  const zoom = document.getElementById('mps-zoom');
  const cards = Array.from(document.querySelectorAll('.mps-card'));
  const score = (card, dim) => {
    const v = parseFloat(card.getAttribute('data-score-' + dim));
    return Number.isFinite(v) ? v : -Infinity;
  };
  function sortBy(dim) {
    document.querySelectorAll('[data-sortable]').forEach((box) => {
      const items = Array.from(box.children);
      items.sort((x, y) => {
        const a = score(x, dim), b = score(y, dim);
        return a === b ? 0 : (a < b ? 1 : -1);
      });
      const frag = document.createDocumentFragment();
      items.forEach((c) => frag.appendChild(c));
      box.appendChild(frag);
    });
    document.querySelectorAll('.bar-row').forEach((r) => r.classList.toggle('on', r.dataset.dim === dim));
  }
  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    document.querySelectorAll('.mps-unit').forEach((unit) => {
      const own = unit.classList.contains('mps-card') ? [unit] : Array.from(unit.querySelectorAll('.mps-card'));
      const hit = !q || own.some((c) => ((c.dataset.prompt || '') + '\n' + (c.dataset.image || ''))
        .toLowerCase().includes(q));
      unit.hidden = !hit;
    });
    document.querySelectorAll('.mps-group').forEach((g) => {
      g.hidden = !g.querySelector('.mps-unit:not([hidden])');
    });
    const shown = cards.filter((c) => !c.closest('[hidden]')).length;
    count.textContent = shown + ' of ' + cards.length + ' images';
  }
  function open(card) {
    const img = card.querySelector('img');
    if (!img) return;
    const z = zoom.querySelector('img');
    z.src = card.dataset.full || img.src;
    zoom.querySelector('.z-prompt').textContent = card.dataset.prompt || '';
    zoom.querySelector('.z-image').textContent = card.dataset.image || '';
    zoom.querySelector('.z-scores').textContent = Array.from(card.attributes)
      .filter((a) => a.name.startsWith('data-score-'))
      .map((a) => a.name.slice(11) + ' ' + parseFloat(a.value).toFixed(3)).join('   ');
    zoom.hidden = false;
  }
  document.addEventListener('click', (ev) => {
    if (!zoom.hidden) { zoom.hidden = true; return; }
    const t = ev.target.closest('.thumb');
    if (t) open(t.closest('.mps-card'));
  });
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') zoom.hidden = true;
    else if (ev.key === 'Enter' && ev.target.classList && ev.target.classList.contains('mps-card')) open(ev.target);
  });
  if (sort) {
    const gallery = document.querySelector('[data-default-sort]');
    const first = gallery ? gallery.dataset.defaultSort : sort.value;
    if (Array.from(sort.options).some((o) => o.value === first)) sort.value = first;
    sort.addEventListener('change', () => sortBy(sort.value));
    document.querySelectorAll('.bar-row').forEach((r) => r.classList.toggle('on', r.dataset.dim === sort.value));
  }
  if (filter) { filter.addEventListener('input', applyFilter); applyFilter(); }
})();
