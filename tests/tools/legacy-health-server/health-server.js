#!/usr/bin/env node
// A minimal stand-in for the seeds' `infra/scripts/health-server.js`, written from their
// description (rollout guide, sections 7 and "EC2 health server"), to test the operator against
// the old protocol exactly as the fleet runs it today:
//
//   GET  /health  -> {status, cpu, memoryTotalMb, memoryUsedMb, diskTotalGb, diskUsedGb,
//                     adspowerStatus, activeProfiles, activeWorkers, uptime}
//   POST /deploy  {"image_tag": "..."} -> {"success": true, "message": "Deploy of <tag> initiated"}
//                 answered at once; `<deploy script> deploy <tag>` runs in the background.
//
// No token, no image tag, no deploy record, no /drain: that is what makes it the old server.
// Settings (environment): PORT (8000), HOST (0.0.0.0), DEPLOY_SCRIPT
// (/opt/ghosthands/scripts/deploy.sh), WORKER_STATUS_URL (http://localhost:3101/worker/status,
// read for activeWorkers), ADSPOWER_URL (http://localhost:50325/status).
'use strict';

const http = require('http');
const os = require('os');
const fs = require('fs');
const { spawn } = require('child_process');

const PORT = Number(process.env.PORT || 8000);
const HOST = process.env.HOST || '0.0.0.0';
const DEPLOY_SCRIPT = process.env.DEPLOY_SCRIPT || '/opt/ghosthands/scripts/deploy.sh';
const WORKER_STATUS_URL = process.env.WORKER_STATUS_URL || 'http://localhost:3101/worker/status';
const ADSPOWER_URL = process.env.ADSPOWER_URL || 'http://localhost:50325/status';

function getJson(url, timeoutMs) {
  return new Promise((resolve) => {
    const req = http.get(url, { timeout: timeoutMs }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => {
        try {
          resolve({ ok: res.statusCode >= 200 && res.statusCode < 300, json: JSON.parse(body) });
        } catch (_) {
          resolve({ ok: res.statusCode >= 200 && res.statusCode < 300, json: null });
        }
      });
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve({ ok: false, json: null }));
  });
}

function cpuPercent() {
  const load = os.loadavg()[0];
  return Math.round((load / os.cpus().length) * 1000) / 10;
}

function disk() {
  try {
    const s = fs.statfsSync('/');
    const gb = 1024 * 1024 * 1024;
    return {
      total: Math.round((s.blocks * s.bsize) / gb),
      used: Math.round(((s.blocks - s.bfree) * s.bsize) / gb),
    };
  } catch (_) {
    return { total: 0, used: 0 };
  }
}

async function health() {
  const worker = await getJson(WORKER_STATUS_URL, 2000);
  const ads = await getJson(ADSPOWER_URL, 2000);
  const d = disk();
  const mb = 1024 * 1024;
  return {
    status: 'ok',
    cpu: cpuPercent(),
    memoryTotalMb: Math.round(os.totalmem() / mb),
    memoryUsedMb: Math.round((os.totalmem() - os.freemem()) / mb),
    diskTotalGb: d.total,
    diskUsedGb: d.used,
    adspowerStatus: ads.ok ? 'running' : 'stopped',
    activeProfiles: ads.ok && ads.json && Number.isInteger(ads.json.activeProfiles) ? ads.json.activeProfiles : 0,
    activeWorkers: worker.ok && worker.json && Number.isInteger(worker.json.activeWorkers) ? worker.json.activeWorkers : 0,
    uptime: Math.round(os.uptime()),
  };
}

function send(res, code, body) {
  res.writeHead(code, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/health') {
    health().then((h) => send(res, 200, h), (e) => send(res, 500, { status: 'error', error: String(e) }));
    return;
  }
  if (req.method === 'POST' && req.url === '/deploy') {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      let tag;
      try {
        tag = JSON.parse(body || '{}').image_tag;
      } catch (_) {
        return send(res, 400, { success: false, message: 'invalid JSON body' });
      }
      if (typeof tag !== 'string' || !/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/.test(tag)) {
        return send(res, 400, { success: false, message: 'image_tag is required' });
      }
      const child = spawn(DEPLOY_SCRIPT, ['deploy', tag], { detached: true, stdio: 'ignore' });
      child.on('error', (e) => console.error(`deploy script failed to start: ${e.message}`));
      child.unref();
      console.log(`deploy of ${tag} initiated`);
      send(res, 200, { success: true, message: `Deploy of ${tag} initiated` });
    });
    return;
  }
  send(res, 404, { error: 'not found' });
});

server.listen(PORT, HOST, () => console.log(`health server listening on ${HOST}:${PORT}`));
