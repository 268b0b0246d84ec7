fetch('/healthz').then(r => r.json()).then(h => {
  document.getElementById('health').textContent = JSON.stringify(h, null, 2);
});
