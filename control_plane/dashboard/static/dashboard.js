// loraforge dashboard: live updates over Server-Sent Events, the loss chart (uPlot),
// confirmations and copy buttons. Loaded as a file (the CSP forbids inline script).
"use strict";

(function () {
  // ---- confirmations: a form with data-confirm asks before it is sent
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    }
  }, true);

  // ---- copy buttons
  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-copy]") : null;
    if (!button) return;
    var text = button.dataset.copy;
    var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectText(button); });
    } else {
      selectText(button);
    }
  });

  function selectText(button) {
    var code = button.parentElement.querySelector("code");
    if (!code) return;
    var range = document.createRange();
    range.selectNodeContents(code);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Press Ctrl+C";
  }

  function elementOf(html) {
    var template = document.createElement("template");
    template.innerHTML = html.trim();
    return template.content.firstElementChild;
  }

  function replaceWithHtml(element, html) {
    var fresh = elementOf(html);
    if (!fresh) return null;
    element.replaceWith(fresh);
    if (window.htmx) window.htmx.process(fresh);
    return fresh;
  }

  // A redraw that arrives while a pointer is pressed waits until it is released (and the click
  // it makes has been dispatched): a browser dispatches no click when the element the press
  // began on leaves the page before the release, so a person pressing Pause or Cancel as the
  // job page's summary or a jobs table's row is redrawn lost their click. The latest redraw of
  // each panel is kept.
  var pressed = false, deferred = new Map();
  // Only the primary button's press can make a click: another's release may never reach the
  // page (a context menu takes it), and one seen moving with no button down releases it too.
  document.addEventListener("pointerdown", function (event) {
    if (event.button === 0) pressed = true;
  }, true);
  function released() {
    if (!pressed) return;
    setTimeout(function () {
      pressed = false;
      var redraws = Array.from(deferred.values());
      deferred.clear();
      redraws.forEach(function (redraw) { redraw(); });
    }, 0);
  }
  ["pointerup", "pointercancel"].forEach(function (type) {
    document.addEventListener(type, released, true);
  });
  window.addEventListener("blur", released);
  document.addEventListener("pointermove", function (event) {
    if (pressed && event.buttons === 0) released();
  }, true);
  function redrawWhenReleased(key, redraw) {
    if (pressed) deferred.set(key, redraw); else redraw();
  }

  // A live panel redrawn while a person is in one of its forms (the job page's priority): that
  // form stays the very element they are in, with what they typed and where their caret was;
  // the rest is new. A redraw that changes nothing (the stream's first) is left out.
  function replaceKeepingForms(element, html) {
    var fresh = elementOf(html);
    if (!fresh || fresh.isEqualNode(element)) return;
    var focused = document.activeElement;
    var kept = Array.prototype.filter.call(element.querySelectorAll("form[id]"), function (form) {
      return form.contains(focused) || Array.prototype.some.call(
        form.querySelectorAll("input"), function (field) { return field.value !== field.defaultValue; });
    });
    element.replaceWith(fresh);
    kept.forEach(function (form) {
      var slot = fresh.querySelector("#" + CSS.escape(form.id));
      if (slot) slot.replaceWith(form);
    });
    if (window.htmx) window.htmx.process(fresh);
    if (focused && fresh.contains(focused)) focused.focus();
  }

  // ---- the jobs table: rows replaced as their jobs move
  var jobsStream = null, followedTable = null;
  function followJobsTable() {
    var table = document.getElementById("jobs-table");
    if (table === followedTable) return;
    if (jobsStream) { jobsStream.close(); jobsStream = null; }
    followedTable = table;
    if (!table || !table.dataset.stream) return;
    jobsStream = new EventSource(table.dataset.stream);
    jobsStream.addEventListener("row", function (event) {
      var fresh = elementOf(event.data);
      if (!fresh || !fresh.id) return;
      redrawWhenReleased(fresh.id, function () {
        var current = document.getElementById(fresh.id);
        if (current) replaceWithHtml(current, event.data);
      });
    });
    jobsStream.addEventListener("newer", function (event) {
      var count = parseInt(event.data, 10) || 0;
      var banner = document.getElementById("newer-jobs");
      if (!banner) return;
      document.getElementById("newer-count").textContent = event.data;
      banner.hidden = count === 0;
    });
  }

  // ---- the job page: log, chart, summary
  function followJob() {
    var live = document.getElementById("job-live");
    if (!live) return;
    var chart = lossChart(document.getElementById("loss-chart"));
    if (live.dataset.finished === "true") return;
    var stream = new EventSource(live.dataset.stream);
    stream.addEventListener("log", function (event) {
      var log = document.getElementById("event-log");
      var template = document.createElement("template");
      template.innerHTML = event.data.trim();
      var item = template.content.firstElementChild;
      if (item && !document.getElementById(item.id)) log.prepend(item);
    });
    stream.addEventListener("metric", function (event) {
      if (chart) chart.add(JSON.parse(event.data));
    });
    stream.addEventListener("summary", function (event) {
      redrawWhenReleased("job-summary", function () {
        var summary = document.getElementById("job-summary");
        if (summary) replaceKeepingForms(summary, event.data);
      });
    });
    stream.addEventListener("end", function () {
      stream.close();
      live.dataset.finished = "true";
    });
  }

  // A loss chart in `holder`, from its data-metrics JSON: train and eval loss against step,
  // and a gradient norm on a right-hand axis where the JSON has one (an interactive model's);
  // a job's points also arrive over its stream. data-log-toggle and data-note name the
  // chart's log-scale switch and its note, where it has them.
  // A loss as a chart's legend shows it.
  function fmt(u, v) { return v === null || v === undefined ? "—" : v.toFixed(4); }

  function lossChart(holder) {
    if (!holder || !window.uPlot) return null;
    var steps = [], train = [], evalLoss = [], gradNorm = [], index = new Map(), plot = null, pending = [];
    var withGrad = false;
    var logToggle = holder.dataset.logToggle ? document.getElementById(holder.dataset.logToggle) : null;
    var note = holder.dataset.note ? document.getElementById(holder.dataset.note) : null;

    function put(step, trainLoss, evaluation, grad) {
      var at = index.get(step);
      if (at === undefined) {
        // Steps arrive in order; keep the arrays sorted all the same.
        var position = steps.length;
        while (position > 0 && steps[position - 1] > step) position--;
        steps.splice(position, 0, step);
        train.splice(position, 0, null);
        evalLoss.splice(position, 0, null);
        gradNorm.splice(position, 0, null);
        index.clear();
        for (var i = 0; i < steps.length; i++) index.set(steps[i], i);
        at = position;
      }
      if (trainLoss !== null && trainLoss !== undefined) train[at] = trainLoss;
      if (evaluation !== null && evaluation !== undefined) evalLoss[at] = evaluation;
      if (grad !== null && grad !== undefined) gradNorm[at] = grad;
    }

    function data() { return withGrad ? [steps, train, evalLoss, gradNorm] : [steps, train, evalLoss]; }

    function build() {
      if (plot) plot.destroy();
      var width = Math.max(320, holder.clientWidth || 600);
      var axes = [
        { label: "step" },
        { label: "loss", size: 60 },
      ];
      var series = [
        { label: "step" },
        { label: "train loss", stroke: "#2563eb", width: 1.5, spanGaps: true, value: fmt },
        { label: "eval loss", stroke: "#dc2626", width: 2, spanGaps: true, points: { show: true, size: 6 }, value: fmt },
      ];
      if (withGrad) {
        axes.push({ scale: "grad", label: "grad norm", side: 1, size: 60, grid: { show: false } });
        series.push({ label: "grad norm", scale: "grad", stroke: "#16a34a", width: 1, spanGaps: true, value: fmt });
      }
      plot = new uPlot({
        width: width,
        height: 320,
        cursor: { drag: { x: true, y: false } },
        scales: { x: { time: false }, y: { distr: logToggle && logToggle.checked ? 3 : 1 } },
        axes: axes,
        series: series,
      }, data(), holder);
    }

    function redraw() { if (plot) plot.setData(data()); }

    var chart = {
      add: function (point) {
        if (!plot) { pending.push(point); return; }
        put(point.step, point.train_loss, point.eval_loss);
        redraw();
        holder.dataset.points = String(steps.length);
      },
    };

    fetch(holder.dataset.metrics, { credentials: "same-origin" })
      .then(function (response) { return response.json(); })
      .then(function (body) {
        body.train.steps.forEach(function (s, i) { put(s, body.train.values[i], null); });
        body.eval.steps.forEach(function (s, i) { put(s, null, body.eval.values[i]); });
        if (body.grad_norm) {
          withGrad = true;
          body.grad_norm.steps.forEach(function (s, i) { put(s, null, null, body.grad_norm.values[i]); });
        }
        build();
        pending.forEach(function (p) { put(p.step, p.train_loss, p.eval_loss); });
        pending = [];
        redraw();
        holder.dataset.points = String(steps.length);
        holder.dataset.ready = "true";
        if (note) {
          note.textContent = steps.length === 0
            ? "No metrics yet: points appear as the trainer reports its steps."
            : body.downsampled
              ? "Showing " + steps.length.toLocaleString() + " points summarising " + body.points_in_job.toLocaleString() + " (mean per step bucket)."
              : "";
        }
      });

    if (logToggle) logToggle.addEventListener("change", build);
    window.addEventListener("resize", function () {
      if (plot) plot.setSize({ width: Math.max(320, holder.clientWidth), height: 320 });
    });
    return chart;
  }

  // ---- the session page: a model's curve, drawn when its <details> first opens (the first
  // is open from the start); a model's "curve" link opens it
  function followCurves() {
    document.querySelectorAll("details.curve").forEach(function (details) {
      var draw = function () {
        var holder = details.querySelector(".chart[data-metrics]");
        if (!details.open || !holder || holder.dataset.drawn) return;
        holder.dataset.drawn = "true";
        lossChart(holder);
      };
      details.addEventListener("toggle", draw);
      draw();
    });
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a.curve-link") : null;
    var target = link && document.getElementById(link.getAttribute("href").slice(1));
    if (target && target.tagName === "DETAILS") target.open = true;
  });

  // ---- the compare page: each job's train (or eval) loss, one series a job, on shared steps
  var COMPARE_COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
    "#ca8a04", "#db2777", "#4b5563", "#65a30d", "#7c3aed", "#0f766e"];

  // Both charts of the page draw from one answer.
  var compareAnswers = new Map();
  function compareCurves(url, fresh) {
    if (fresh || !compareAnswers.has(url)) {
      compareAnswers.set(url, fetch(url, { credentials: "same-origin" }).then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      }));
    }
    return compareAnswers.get(url);
  }

  function compareChart(holder) {
    if (!window.uPlot) return;
    var which = holder.dataset.series;
    var logToggle = holder.dataset.logToggle ? document.getElementById(holder.dataset.logToggle) : null;
    var plot = null, body = null;

    function data() {
      var steps = new Set();
      body.jobs.forEach(function (job) { job[which].steps.forEach(function (s) { steps.add(s); }); });
      var xs = Array.from(steps).sort(function (a, b) { return a - b; });
      var at = new Map(xs.map(function (s, i) { return [s, i]; }));
      var columns = [xs];
      body.jobs.forEach(function (job) {
        var ys = xs.map(function () { return null; });
        job[which].steps.forEach(function (s, i) { ys[at.get(s)] = job[which].values[i]; });
        columns.push(ys);
      });
      return columns;
    }

    function build() {
      if (plot) plot.destroy();
      var series = [{ label: "step" }];
      body.jobs.forEach(function (job, i) {
        series.push({
          label: job.label,
          stroke: COMPARE_COLOURS[i % COMPARE_COLOURS.length],
          width: 1.5,
          spanGaps: true,
          points: { show: which === "eval", size: 5 },
          value: fmt,
        });
      });
      plot = new uPlot({
        width: Math.max(320, holder.clientWidth || 600),
        height: 320,
        cursor: { drag: { x: true, y: false } },
        scales: { x: { time: false }, y: { distr: logToggle && logToggle.checked ? 3 : 1 } },
        axes: [{ label: "step" }, { label: which + " loss", size: 60 }],
        series: series,
      }, data(), holder);
      holder.dataset.jobs = String(body.jobs.length);
      holder.dataset.ready = "true";
    }

    // What the chart says instead of, or beside, its curves: none yet, or a read that failed
    // (the next one draws again).
    var note = document.createElement("p");
    note.className = "muted chart-note";
    holder.after(note);

    function any() {
      return body.jobs.some(function (job) { return job[which].steps.length > 0; });
    }

    var asked = 0;
    function draw(fresh) {
      var mine = ++asked;
      compareCurves(holder.dataset.metrics, fresh).then(function (answer) {
        if (mine !== asked) return;  // an older answer than one already asked for
        body = answer;
        delete holder.dataset.failed;
        note.textContent = "";
        if (holder.dataset.empty && !any()) {
          holder.hidden = true;
          note.textContent = holder.dataset.empty;
        } else {
          holder.hidden = false;
          if (plot) plot.setData(data());
          else build();
        }
        holder.dataset.drawn = String(Number(holder.dataset.drawn || 0) + 1);
      }, function (why) {
        if (mine !== asked) return;
        holder.dataset.failed = "true";
        note.textContent = "The curves could not be read (" + why.message + "); they are read again as the jobs move.";
      });
    }
    draw(false);
    // The page's stream says when the curves moved: the first chart asks again, the others
    // share its answer.
    holder.addEventListener("compare:curves", function (event) { draw(event.detail.first); });
    if (logToggle) logToggle.addEventListener("change", function () { if (body) build(); });
    window.addEventListener("resize", function () {
      if (plot) plot.setSize({ width: Math.max(320, holder.clientWidth), height: 320 });
    });
  }

  // The compare page's stream: the table redrawn and the curves read again as the jobs train.
  function followCompare() {
    var live = document.getElementById("compare-live");
    if (!live || !live.dataset.stream || live.dataset.finished || !window.EventSource) return;
    var stream = new EventSource(live.dataset.stream);
    stream.addEventListener("table", function (event) {
      live.innerHTML = event.data;  // the server's own rendering, escaped as every page is
      live.dataset.redrawn = String(Number(live.dataset.redrawn || 0) + 1);
    });
    stream.addEventListener("curves", function () {
      document.querySelectorAll(".compare-chart[data-metrics]").forEach(function (holder, i) {
        holder.dispatchEvent(new CustomEvent("compare:curves", { detail: { first: i === 0 } }));
      });
    });
    stream.addEventListener("gone", function () {
      stream.close();
      var note = document.getElementById("compare-note");
      if (note) note.textContent = "A job compared here was deleted: reload the page.";
    });
    stream.addEventListener("end", function () {
      stream.close();
      live.dataset.finished = "true";
      var note = document.getElementById("compare-note");
      if (note) note.textContent = "Every job here is over.";
    });
  }

  // ---- the adapter page's "Try it" box: the form sent by fetch, its replies read as they are
  // sampled (one JSON object a line: `answers`, each side's `text`, its whole `answer`, `end`;
  // adapter_try.py); "Stop" aborts the request, which stops the executor's sampling. What the
  // page refused (say a key that became a reader's) or no answer at all is said in the box.
  function tryFailed(result, why) {
    var note = document.createElement("p");
    note.className = "error";
    note.id = "try-failed";
    note.setAttribute("role", "alert");
    note.textContent = why;
    result.replaceChildren(note);
  }

  function tryEvent(result, event) {
    if (event.event === "answers") {
      result.innerHTML = event.html;
    } else if (event.event === "text") {
      var reply = result.querySelector("#try-" + event.side + " pre.reply");
      if (reply) reply.append(event.text);
    } else if (event.event === "answer") {
      var side = document.getElementById("try-" + event.side);
      var whole = document.createElement("template");
      whole.innerHTML = event.html.trim();
      if (side && whole.content.firstElementChild) side.replaceWith(whole.content.firstElementChild);
    }
  }

  // The response's body, a line at a time, each line's event shown as it comes.
  function tryRead(result, response) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var pending = "";
    function next() {
      return reader.read().then(function (part) {
        pending += decoder.decode(part.value || new Uint8Array(), { stream: !part.done });
        var lines = pending.split("\n");
        pending = part.done ? "" : lines.pop();
        lines.forEach(function (line) {
          if (line.trim()) tryEvent(result, JSON.parse(line));
        });
        if (!part.done) return next();
      });
    }
    return next();
  }

  // The sides still sampled when the reading ended early: what they had is kept, and why.
  function tryCut(result, why) {
    result.querySelectorAll(".try-answer.sampling").forEach(function (side) {
      side.classList.remove("sampling");
      var reply = side.querySelector("pre.reply");
      if (reply) reply.removeAttribute("aria-busy");
      var note = side.querySelector(".sampling-note");
      if (note) {
        note.classList.add("stopped");
        note.textContent = why;
      }
    });
  }

  function followTry() {
    var form = document.getElementById("try-form");
    var result = document.getElementById("try-result");
    if (!form || !result || !window.fetch || !window.TextDecoder || !window.AbortController) return;
    var ask = document.getElementById("try-button");
    var stop = document.getElementById("try-stop");
    var asking = document.getElementById("try-asking");
    var running = null;
    function busy(on) {
      ask.disabled = on;
      stop.hidden = !on;
      if (!on) asking.hidden = true;
      result.dataset.state = on ? "asking" : "done";
    }
    stop.addEventListener("click", function () {
      if (running) running.abort();
    });
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (running) return;
      var controller = new AbortController();
      running = controller;
      busy(true);
      asking.hidden = false;
      fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "application/x-ndjson" },
        credentials: "same-origin",
        signal: controller.signal,
      })
        .then(function (response) {
          asking.hidden = true;
          var signIn = response.headers.get("HX-Redirect");
          if (response.status === 401 && signIn) {
            window.location.href = signIn;  // signed out meanwhile: sign in again
            return;
          }
          if (!response.ok) {
            tryFailed(result, "The dashboard refused this (HTTP " + response.status + "): reload the page and try again.");
            return;
          }
          if ((response.headers.get("Content-Type") || "").indexOf("application/x-ndjson") !== 0) {
            return response.text().then(function (html) {
              result.innerHTML = html;  // nothing was asked: the fields it could not take
            });
          }
          return tryRead(result, response);
        })
        .catch(function () {
          if (controller.signal.aborted) tryCut(result, "stopped: the rest was not sampled");
          else if (result.querySelector(".try-answer.sampling")) tryCut(result, "the connection was lost: ask again");
          else tryFailed(result, "The dashboard could not be reached: try again.");
        })
        .finally(function () {
          running = null;
          busy(false);
        });
    });
  }

  function start() {
    followJobsTable();
    followJob();
    followCurves();
    document.querySelectorAll(".compare-chart[data-metrics]").forEach(compareChart);
    followCompare();
    followTry();
  }

  document.addEventListener("DOMContentLoaded", start);
  // The filter form swaps the table in place: follow the new rows.
  document.addEventListener("htmx:afterSettle", followJobsTable);
})();
