// The live console of a running job: follows /jobs/ID/live (Server-Sent Events) and appends
// each piece as text (never as HTML: the console is a stranger's). When the attempt ends or
// another one takes the job, the page is drawn again. Without JavaScript the page refreshes
// itself every few seconds instead.
"use strict";
(function () {
  const pre = document.getElementById("console");
  if (!pre || !pre.dataset.live || !window.EventSource) {
    return;
  }
  const source = new EventSource(pre.dataset.live);
  const nearBottom = () =>
    pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
  source.addEventListener("console", (e) => {
    const follow = nearBottom();
    for (const seg of JSON.parse(e.data)) {
      const span = document.createElement("span");
      if (seg.class) {
        span.className = seg.class;
      }
      span.textContent = seg.text;
      pre.appendChild(span);
    }
    pre.dataset.received = e.lastEventId;
    if (follow) {
      pre.scrollTop = pre.scrollHeight;
    }
  });
  const redraw = () => {
    source.close();
    window.setTimeout(() => window.location.reload(), 300);
  };
  source.addEventListener("end", redraw);
  source.addEventListener("attempt", redraw);
})();
