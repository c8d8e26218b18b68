// The WebSocket load generator for bench/ws_run.py (one Node process, the `ws` package).
//
// relay mode: open --sessions sessions, then in each one send a text message
// of --size bytes, wait for its echo, check that the echo is byte for byte
// what was sent, and send the next one (one message in flight per session, a
// closed loop like wrk's).  After --warmup seconds the next --duration seconds
// are measured: echoes received and their round-trip times.  Then sending
// stops, the messages still in flight get --drain seconds to come back, and
// every session is closed with 1000.
//
//     node load.js relay --url ws://127.0.0.1:PORT/chat --sessions 100 --size 100
//                        --warmup 2 --duration 10 --out result.json
//
// idle mode: open --sessions sessions (--open-concurrency at a time) and send
// nothing.  When every attempt has finished, write the status file; on
// SIGUSR2 close every session with 1000, wait (at most --drain seconds) for
// the closes, write the status file again and exit.  --hold is the longest the
// sessions are held without a SIGUSR2 (a safety net: then the same close).
//
//     node load.js idle --url wss://127.0.0.1:PORT/chat --sessions 5000 --out status.json
//
// wss:// certificates are not checked (the benchmark's are self-signed).
// No compression is offered.  The result files are JSON; progress goes to stderr.
'use strict';

const fs = require('fs');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

function parseArgs(argv) {
  const mode = argv[0];
  const options = { mode, url: null, sessions: 100, size: 100, warmup: 2, duration: 10, drain: 5,
                    out: null, openConcurrency: 200, connectTimeout: 60, hold: 600, handshakeTimeout: 30,
                    watch: '', clockTicks: 100 };
  const names = { '--url': 'url', '--sessions': 'sessions', '--size': 'size', '--warmup': 'warmup',
                  '--duration': 'duration', '--drain': 'drain', '--out': 'out',
                  '--open-concurrency': 'openConcurrency', '--connect-timeout': 'connectTimeout',
                  '--hold': 'hold', '--handshake-timeout': 'handshakeTimeout', '--watch': 'watch',
                  '--clock-ticks': 'clockTicks' };
  const strings = new Set(['url', 'out', 'watch']);
  for (let i = 1; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (key === undefined || i + 1 >= argv.length) usage(`bad option ${argv[i]}`);
    const value = argv[i + 1];
    options[key] = strings.has(key) ? value : Number(value);
    if (!strings.has(key) && !Number.isFinite(options[key])) usage(`bad value for ${argv[i]}`);
  }
  if ((mode !== 'relay' && mode !== 'idle') || !options.url || !options.out) usage('need a mode, --url and --out');
  if (options.size < 40) usage('--size must be at least 40 bytes');
  return options;
}

function usage(message) {
  console.error(`load.js: ${message}\nusage: node load.js relay|idle --url URL --out FILE [options]`);
  process.exit(2);
}

const options = parseArgs(process.argv.slice(2));
const CLIENT_OPTIONS = { perMessageDeflate: false, rejectUnauthorized: false,
                         handshakeTimeout: options.handshakeTimeout * 1000, maxPayload: 16 * 1024 * 1024 };

function writeJson(path, data) {
  const temporary = `${path}.tmp`;
  fs.writeFileSync(temporary, JSON.stringify(data, null, 2) + '\n');
  fs.renameSync(temporary, path);  // the reader never sees half a file
}

// -- CPU use of the benchmark's processes during the measured run
//
// --watch "proxy=PID+PID,upstream=PID": the processes to watch, by name.  Their
// CPU time is read from /proc/PID/stat at the start and the end of the measured
// run, as is the whole machine's (/proc/stat), so that "other" (processes the
// benchmark did not start) can be told apart.

function parseWatch(text) {
  const watched = {};
  for (const item of text.split(',').filter(Boolean)) {
    const [name, pids] = item.split('=');
    watched[name] = pids.split('+').map(Number);
  }
  return watched;
}

function processTicks(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[11]) + Number(fields[12]);  // utime, stime
  } catch (error) {
    return 0;  // gone
  }
}

function cpuSample(watched) {
  const sample = {};
  for (const [name, pids] of Object.entries(watched)) {
    sample[name] = pids.reduce((total, pid) => total + processTicks(pid), 0) / options.clockTicks;
  }
  const usage = process.cpuUsage();
  sample.load = (usage.user + usage.system) / 1e6;
  const [user, nice, system, , , irq, softirq, steal] =
    fs.readFileSync('/proc/stat', 'latin1').split('\n')[0].split(/\s+/).slice(1, 9).map(Number);
  sample.process = (user + nice + system) / options.clockTicks;
  sample.irq = (irq + softirq) / options.clockTicks;
  sample.steal = steal / options.clockTicks;
  sample.wall = performance.now() / 1000;
  return sample;
}

function cpuCores(before, after, watched) {
  const wall = after.wall - before.wall;
  const cores = {};
  let ours = 0;
  for (const name of [...Object.keys(watched), 'load']) {
    cores[name] = (after[name] - before[name]) / wall;
    ours += cores[name];
  }
  cores.other = Math.max(0, (after.process - before.process) / wall - ours);
  cores.irq = (after.irq - before.irq) / wall;
  cores.steal = (after.steal - before.steal) / wall;
  for (const name of Object.keys(cores)) cores[name] = Math.round(cores[name] * 100) / 100;
  return cores;
}

const WATCHED = parseWatch(options.watch);

// -- latency histogram: 1 µs bins up to 100 ms, exact values above

const BINS = 100000;
class Histogram {
  constructor() { this.bins = new Uint32Array(BINS); this.over = []; this.count = 0; this.sum = 0; this.max = 0; }
  add(ms) {
    const us = Math.floor(ms * 1000);
    if (us < BINS) this.bins[us] += 1; else this.over.push(ms);
    this.count += 1; this.sum += ms; if (ms > this.max) this.max = ms;
  }
  percentile(p) {
    if (this.count === 0) return null;
    const rank = Math.max(1, Math.ceil(this.count * p / 100));
    let seen = 0;
    for (let us = 0; us < BINS; us += 1) {
      seen += this.bins[us];
      if (seen >= rank) return (us + 0.5) / 1000;
    }
    this.over.sort((a, b) => a - b);
    return this.over[rank - seen - 1];
  }
  summary() {
    return { count: this.count, mean_ms: this.count ? this.sum / this.count : null,
             p50_ms: this.percentile(50), p90_ms: this.percentile(90), p99_ms: this.percentile(99),
             p999_ms: this.percentile(99.9), max_ms: this.count ? this.max : null };
  }
}

// -- opening sessions, a bounded number at a time

function openSessions(count, concurrency, onOpen, onProblem) {
  return new Promise((resolve) => {
    const sockets = new Array(count).fill(null);
    let next = 0; let pending = 0; let opened = 0; let failed = 0;
    const firstErrors = [];
    const deadline = setTimeout(() => finish(true), options.connectTimeout * 1000);
    let done = false;
    function finish(timedOut) {
      if (done) return;
      done = true;
      clearTimeout(deadline);
      resolve({ sockets, opened, failed, timedOut, firstErrors });
    }
    function launch() {
      while (!done && pending < concurrency && next < count) {
        const index = next; next += 1; pending += 1;
        const socket = new WebSocket(options.url, CLIENT_OPTIONS);
        let settled = false;
        socket.on('open', () => {
          settled = true; pending -= 1; opened += 1; sockets[index] = socket;
          onOpen(socket, index);
          step();
        });
        socket.on('error', (error) => {
          onProblem(index, `error: ${error.message}`);
          if (!settled) {
            settled = true; pending -= 1; failed += 1;
            if (firstErrors.length < 5) firstErrors.push(error.message);
            step();
          }
        });
        socket.on('unexpected-response', (request, response) => {
          onProblem(index, `handshake answered ${response.statusCode}`);
          if (!settled) {
            settled = true; pending -= 1; failed += 1;
            if (firstErrors.length < 5) firstErrors.push(`status ${response.statusCode}`);
            request.destroy();
            step();
          }
        });
      }
    }
    function step() {
      if (opened + failed === count) finish(false); else launch();
    }
    if (count === 0) finish(false); else launch();
  });
}

function closeAll(sockets, timeoutSeconds) {
  return new Promise((resolve) => {
    let open = 0; const codes = {};
    const timer = setTimeout(() => resolve({ notClosed: open, codes }), timeoutSeconds * 1000);
    const check = () => { if (open === 0) { clearTimeout(timer); resolve({ notClosed: 0, codes }); } };
    for (const socket of sockets) {
      if (socket === null || socket.readyState === WebSocket.CLOSED) continue;
      open += 1;
      socket.once('close', (code) => { open -= 1; codes[code] = (codes[code] || 0) + 1; check(); });
      if (socket.readyState === WebSocket.OPEN) socket.close(1000, 'bench done');
    }
    check();
  });
}

// -- relay mode

async function relay() {
  const size = options.size;
  const state = [];  // per session: { buffer, seq, sentAt, inFlight }
  const problems = {};
  const note = (what) => { problems[what] = (problems[what] || 0) + 1; };
  let phase = 'connecting';  // connecting, warmup, measure, drain, closing
  let inFlight = 0; let mismatched = 0; let unexpectedCloses = 0;
  let warmupEchoes = 0; let measuredEchoes = 0; let measuredBytes = 0;
  const histogram = new Histogram();
  let measureStart = 0; let measureEnd = 0;
  let drainResolve = null;

  function makeBuffer(index) {
    const head = `{"session":${String(index).padStart(6, '0')},"seq":000000000000,"text":"`;
    const tail = '"}';
    const filler = 'chat message '.repeat(Math.ceil(size / 13)).slice(0, size - head.length - tail.length);
    return Buffer.from(head + filler + tail, 'utf8');
  }
  const seqOffset = makeBuffer(0).indexOf('"seq":') + 6;

  function send(index) {
    const s = state[index];
    s.seq += 1;
    s.buffer.write(String(s.seq % 1e12).padStart(12, '0'), seqOffset, 'latin1');
    s.sentAt = performance.now();
    s.inFlight = true; inFlight += 1;
    s.socket.send(s.buffer, { binary: false });
  }

  function onOpen(socket, index) {
    state[index] = { socket, buffer: makeBuffer(index), seq: 0, sentAt: 0, inFlight: false };
    socket.on('message', (data, isBinary) => {
      const now = performance.now();
      const s = state[index];
      if (!s.inFlight) { note('message with none in flight'); return; }
      s.inFlight = false; inFlight -= 1;
      if (isBinary || !s.buffer.equals(data)) mismatched += 1;
      if (phase === 'warmup') {
        warmupEchoes += 1;
      } else if (phase === 'measure') {
        measuredEchoes += 1; measuredBytes += data.length;
        histogram.add(now - s.sentAt);
      }
      if (phase === 'warmup' || phase === 'measure') send(index);
      else if (phase === 'drain' && inFlight === 0 && drainResolve) drainResolve();
    });
    socket.on('close', (code) => {
      if (phase !== 'closing') { unexpectedCloses += 1; note(`closed early with ${code}`); }
      const s = state[index];
      if (s.inFlight) { s.inFlight = false; inFlight -= 1; s.lost = true; }
    });
  }

  const started = performance.now();
  const opening = await openSessions(options.sessions, options.openConcurrency, onOpen,
                                     (index, what) => note(what));
  const connectSeconds = (performance.now() - started) / 1000;
  console.error(`load: ${opening.opened} sessions open, ${opening.failed} failed, in ${connectSeconds.toFixed(2)}s`);
  const live = state.map((s, index) => index).filter((index) => state[index] !== undefined);

  phase = 'warmup';
  for (const index of live) send(index);
  await sleep(options.warmup);
  phase = 'measure';
  const cpuBefore = cpuSample(WATCHED);
  measureStart = performance.now();
  await sleep(options.duration);
  measureEnd = performance.now();
  const cpu = cpuCores(cpuBefore, cpuSample(WATCHED), WATCHED);
  phase = 'drain';
  const seconds = (measureEnd - measureStart) / 1000;
  const inFlightAtEnd = inFlight;
  await new Promise((resolve) => {
    if (inFlight === 0) { resolve(); return; }
    drainResolve = resolve;
    setTimeout(resolve, options.drain * 1000);
  });
  const lost = inFlight + state.filter((s) => s && s.lost).length;
  phase = 'closing';
  const closing = await closeAll(live.map((index) => state[index].socket), options.drain);
  const roundTrips = measuredEchoes;
  writeJson(options.out, {
    mode: 'relay', url: options.url, sessions: options.sessions, opened: opening.opened,
    failed: opening.failed, connect_timed_out: opening.timedOut, connect_errors: opening.firstErrors,
    connect_seconds: connectSeconds, message_bytes: size, warmup_seconds: options.warmup,
    seconds, round_trips: roundTrips, round_trips_per_second: roundTrips / seconds,
    // Every round trip is two messages through a proxy: one to the upstream, its echo back.
    relayed_messages_per_second: 2 * roundTrips / seconds,
    payload_bytes_per_second: 2 * measuredBytes / seconds,
    warmup_round_trips: warmupEchoes, latency: histogram.summary(), cpu_cores: cpu,
    in_flight_at_end: inFlightAtEnd, lost, mismatched, unexpected_closes: unexpectedCloses,
    close_codes: closing.codes, not_closed: closing.notClosed, problems,
  });
  process.exit(0);
}

// -- idle mode

async function idle() {
  let closedEarly = 0; const earlyCodes = {}; let phase = 'opening'; const errors = {};
  let closeRequested = null;
  const requested = new Promise((resolve) => { closeRequested = resolve; });
  process.on('SIGUSR2', () => closeRequested('SIGUSR2'));
  const started = performance.now();
  const opening = await openSessions(options.sessions, options.openConcurrency, (socket) => {
    socket.on('close', (code) => {
      if (phase !== 'closing') { closedEarly += 1; earlyCodes[code] = (earlyCodes[code] || 0) + 1; }
    });
  }, (index, what) => { errors[what] = (errors[what] || 0) + 1; });
  const openSeconds = (performance.now() - started) / 1000;
  const status = () => ({ mode: 'idle', url: options.url, sessions: options.sessions, opened: opening.opened,
                          failed: opening.failed, open_timed_out: opening.timedOut,
                          open_errors: opening.firstErrors, open_seconds: openSeconds,
                          closed_early: closedEarly, closed_early_codes: earlyCodes, errors, phase });
  console.error(`load: ${opening.opened} idle sessions open, ${opening.failed} failed, in ${openSeconds.toFixed(2)}s`);
  phase = 'holding';
  writeJson(options.out, status());
  const holdTimer = setTimeout(() => closeRequested('hold expired'), options.hold * 1000);
  // While holding, refresh the status file now and then (early closes show up).
  const refresh = setInterval(() => writeJson(options.out, status()), 1000);
  const why = await requested;
  clearTimeout(holdTimer); clearInterval(refresh);
  phase = 'closing';
  const closing = await closeAll(opening.sockets, options.drain);
  writeJson(options.out, { ...status(), phase: 'closed', close_reason: why, close_codes: closing.codes,
                           not_closed: closing.notClosed });
  process.exit(0);
}

function sleep(seconds) { return new Promise((resolve) => setTimeout(resolve, seconds * 1000)); }

process.on('SIGTERM', () => process.exit(143));
(options.mode === 'relay' ? relay() : idle()).catch((error) => {
  console.error(`load: ${error.stack || error}`);
  process.exit(1);
});
