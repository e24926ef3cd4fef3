// Test app for pmguard: a tiny HTTP server whose /health behaviour can be switched at runtime.
// No npm dependencies. Works under PM2 fork and cluster mode (workers share the port).
//   GET /health      per mode: ok | 500 | slow:<ms> | hang | spin | crash | exit
//   GET /mode/<mode> sets the mode (a line on stderr says so), answers 200, then (spin/crash/exit)
//                    acts.
// Env: PORT (required), MODE (initial mode, default ok), START_DELAY_MS (listen after a delay),
// HOST (address to bind, default 127.0.0.1), GRACEFUL_MS (catch SIGINT and take this long to
// shut down, as a real server drains; a busy event loop never gets to run the handler),
// DRAIN_CLOSES=1 (with GRACEFUL_MS: close the listener at SIGINT, so new connections are refused).
'use strict';
const http = require('http');

const port = parseInt(process.env.PORT || '', 10);
if (!port) {
  console.error('PORT is required');
  process.exit(2);
}
let mode = process.env.MODE || 'ok';
const host = process.env.HOST || '127.0.0.1';

function act(m) {
  if (m === 'spin') {
    for (;;) {} // blocks the event loop at 100% CPU
  } else if (m === 'crash') {
    process.exit(1);
  } else if (m === 'exit') {
    process.exit(0);
  }
}

function health(res) {
  if (mode === 'ok') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok');
  } else if (mode === '500') {
    res.writeHead(500, { 'content-type': 'text/plain' });
    res.end('error');
  } else if (mode.startsWith('slow:')) {
    const ms = parseInt(mode.slice(5), 10) || 0;
    setTimeout(() => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('ok');
    }, ms);
  } else if (mode === 'hang') {
    // never answer
  } else {
    act(mode);
    res.writeHead(500);
    res.end('unknown mode ' + mode);
  }
}

const server = http.createServer((req, res) => {
  const url = req.url || '/';
  if (url === '/health') {
    health(res);
  } else if (url.startsWith('/mode/')) {
    const m = decodeURIComponent(url.slice('/mode/'.length));
    mode = m;
    console.error('mode ' + m + ' requested');
    res.writeHead(200, { 'content-type': 'text/plain', connection: 'close' });
    res.end('mode ' + m, () => setImmediate(() => act(m)));
  } else {
    res.writeHead(404);
    res.end('not found');
  }
});

function listen() {
  server.listen(port, host, () => {
    console.log('listening on ' + host + ':' + port + ' mode ' + mode + ' pid ' + process.pid);
  });
}

const graceful = parseInt(process.env.GRACEFUL_MS || '0', 10);
if (graceful > 0) {
  process.on('SIGINT', () => {
    // DRAIN_CLOSES=1: stop accepting at once and drain, as most servers do on SIGINT.
    if (process.env.DRAIN_CLOSES === '1') server.close();
    setTimeout(() => process.exit(0), graceful);
  });
}

const delay = parseInt(process.env.START_DELAY_MS || '0', 10);
if (delay > 0) setTimeout(listen, delay); else listen();
