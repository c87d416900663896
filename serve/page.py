"""The page at `/`: upload a real image, see its verdict beside the nearest generated images (the evidence).

Plain HTML and a few lines of script, nothing loaded from elsewhere (the service's content security policy allows
only itself, data: and blob: images). It calls `POST /v1/score?thumbnails=inline` with the bearer token typed
into the page, if any, so it works the same with auth on or off and needs no cookie. Server text is shown with
`textContent` only: an id chosen by a client can never become markup.
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>fingerprint: membership check</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .hint { color: #555; margin-top: 0; }
  form { display: flex; flex-wrap: wrap; gap: .8rem; align-items: end; padding: 1rem; background: #f4f5f7;
         border-radius: 8px; }
  label { display: flex; flex-direction: column; font-size: .85rem; color: #444; gap: .2rem; }
  button { padding: .5rem 1.2rem; font-size: 1rem; }
  #status { margin: 1rem 0; min-height: 1.5rem; }
  #status.error { color: #a40000; }
  .result { display: grid; grid-template-columns: 14rem 1fr; gap: 1.5rem; margin-top: 1rem;
            border-top: 1px solid #ddd; padding-top: 1rem; }
  .query img { width: 14rem; image-rendering: pixelated; border: 1px solid #ccc; }
  .verdict { font-size: 1.15rem; font-weight: 600; margin: .4rem 0; }
  .verdict.member { color: #a40000; } .verdict.nonmember { color: #1a6b1a; }
  .neighbours { display: flex; flex-wrap: wrap; gap: .8rem; }
  figure { margin: 0; text-align: center; font-size: .8rem; color: #444; }
  figure img { width: 6rem; height: 6rem; object-fit: contain; image-rendering: pixelated; background: #000;
               border: 1px solid #ccc; display: block; }
  .facts { font-size: .85rem; color: #444; }
</style>
</head>
<body>
<h1>Was this image in the generator's training set?</h1>
<p class="hint">Upload real images (PNG or JPEG). Each gets a membership score, the decision at the served
detector's threshold, and the generated images that sit nearest to it: the evidence behind the decision.</p>
<form id="form">
  <label>Images <input id="files" name="files" type="file" accept="image/png,image/jpeg" multiple required></label>
  <label>Token (only if the service needs one) <input id="token" type="password" autocomplete="off" size="24"></label>
  <button id="submit" type="submit">Score</button>
</form>
<div id="status" role="status"></div>
<div id="results"></div>
<script>
"use strict";
const form = document.getElementById("form");
const statusBox = document.getElementById("status");
const resultsBox = document.getElementById("results");

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(text, isError) {
  statusBox.textContent = text;
  statusBox.className = isError ? "error" : "";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = Array.from(document.getElementById("files").files);
  if (!files.length) { say("Choose at least one image.", true); return; }
  const body = new FormData();
  for (const f of files) body.append("files", f, f.name);
  const headers = {};
  const token = document.getElementById("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  say("Scoring " + files.length + " image(s)...", false);
  resultsBox.replaceChildren();
  let answer;
  try {
    const response = await fetch("/v1/score?thumbnails=inline", {method: "POST", body, headers});
    answer = await response.json();
    if (!response.ok) {
      const hint = response.status === 401 ? " (enter the service's token above)" : "";
      say("Error " + response.status + ": " + (answer.detail || answer.error) + hint, true);
      return;
    }
  } catch (err) {
    say("The service did not answer: " + err, true);
    return;
  }
  say("Detector: " + answer.model.name + " (" + answer.kind + ", version " + answer.model.version +
      "), threshold " + answer.threshold.toFixed(4) + ".", false);
  const byName = new Map(files.map((f) => [f.name.replace(/\\.(png|jpe?g)$/i, ""), f]));
  for (const r of answer.results) {
    const row = el("section", {"class": "result", "data-id": r.id});
    const query = el("div", {"class": "query"});
    const file = byName.get(r.id);
    if (file) query.append(el("img", {src: URL.createObjectURL(file), alt: "uploaded image " + r.id}));
    query.append(el("div", {"class": "facts"}, r.id));
    const right = el("div");
    right.append(el("div", {"class": "verdict " + (r.decision ? "member" : "nonmember")},
      r.decision ? "Likely in the training set" : "Not flagged"));
    right.append(el("div", {"class": "facts"}, "score " + r.score.toFixed(4) + " (threshold " +
      answer.threshold.toFixed(4) + ")" + (r.generated_similarity === null ? "" :
      ", similarity to generated images " + r.generated_similarity.toFixed(4))));
    right.append(el("p", {"class": "facts"}, "Nearest generated images (most similar first):"));
    const strip = el("div", {"class": "neighbours"});
    for (const n of r.nearest) {
      const fig = el("figure");
      if (n.thumbnail) fig.append(el("img", {src: n.thumbnail, alt: "generated image " + n.id}));
      fig.append(el("figcaption", {}, n.id + " - " + n.similarity.toFixed(3)));
      strip.append(fig);
    }
    right.append(strip);
    row.append(query, right);
    resultsBox.append(row);
  }
});
</script>
</body>
</html>
"""
