#!/usr/bin/env node
// Node.js client of the SSJF scheduler over gRPC (ssjf.v1), with @grpc/grpc-js.
//
// The stubs are built at start-up from protos/ by @grpc/proto-loader, the usual way in the
// grpc-js ecosystem (`npm run stubs` / `make stubs` also writes TypeScript types for them).
//
//   node client.js generate "Tell me a joke" [--max-new-tokens 32]   stream one answer
//   node client.js demo                                               submit, stream, cancel
//
// Environment: SSJF_SCHEDULER (host:port, default 127.0.0.1:50051), SSJF_PROTOS (the protos/
// directory, default ../../protos next to this file).
// Secured stacks (compose, Kubernetes, `ssjf up` with TLS/tokens; SECURITY.md), the same
// variables as the ssjf CLI: SSJF_TLS_CA_FILE (PEM CA: dial with TLS), SSJF_TLS_SERVER_NAME
// (name the certificate must carry, when not the dialled host), SSJF_TOKEN or
// SSJF_TOKEN_FILE (sent as `authorization: Bearer <token>` on every call). None set:
// plaintext, no token (an unsecured `ssjf up`).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = process.env.SSJF_PROTOS || path.join(__dirname, '..', '..', 'protos');
const SERVER = process.env.SSJF_SCHEDULER || '127.0.0.1:50051';

function schedulerClient() {
  const definition = protoLoader.loadSync('ssjf/v1/scheduler.proto', {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const ssjf = grpc.loadPackageDefinition(definition).ssjf.v1;
  const { credentials, options } = channelSecurity();
  return new ssjf.Scheduler(SERVER, credentials, options);
}

function channelSecurity() {
  const env = process.env;
  let token = env.SSJF_TOKEN || '';
  if (!token && env.SSJF_TOKEN_FILE) token = fs.readFileSync(env.SSJF_TOKEN_FILE, 'utf8').trim();
  if (!env.SSJF_TLS_CA_FILE) {
    if (token) throw new Error('SSJF_TOKEN needs TLS: set SSJF_TLS_CA_FILE (grpc-js sends no call credentials in plaintext)');
    return { credentials: grpc.credentials.createInsecure(), options: {} };
  }
  let credentials = grpc.credentials.createSsl(fs.readFileSync(env.SSJF_TLS_CA_FILE));
  if (token) {
    const bearer = grpc.credentials.createFromMetadataGenerator((_, callback) => {
      const metadata = new grpc.Metadata();
      metadata.set('authorization', `Bearer ${token}`);
      callback(null, metadata);
    });
    credentials = grpc.credentials.combineChannelCredentials(credentials, bearer);
  }
  const options = env.SSJF_TLS_SERVER_NAME ? { 'grpc.ssl_target_name_override': env.SSJF_TLS_SERVER_NAME } : {};
  return { credentials, options };
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 60_000 }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

// Read a JobEvent stream: calls onToken(token) for each token; resolves with the summary
// (or null when the stream ends without one, e.g. after a cancel).
function readEvents(call, onToken) {
  return new Promise((resolve, reject) => {
    let summary = null;
    call.on('data', (event) => {
      if (event.event === 'token') onToken(event.token);
      else if (event.event === 'summary') summary = event.summary;
    });
    call.on('error', (error) => (error.code === grpc.status.CANCELLED ? resolve(summary) : reject(error)));
    call.on('end', () => resolve(summary));
  });
}

async function generate(client, prompt, maxNewTokens) {
  const call = client.Generate({ prompt, sampling: { max_new_tokens: maxNewTokens } });
  const indexes = [];
  const summary = await readEvents(call, (token) => {
    indexes.push(token.index);
    process.stdout.write(token.text);
  });
  process.stdout.write('\n');
  return { step: 'generate', state: summary.state, tokens: indexes.length, generated_tokens: summary.generated_tokens, ttft_s: summary.time_to_first_token_s };
}

// Submit a job, stream its tokens from another call, and cancel it after a few.
async function submitStreamCancel(client) {
  const submitted = await unary(client, 'Submit', {
    prompt: 'Write a very long story about a lighthouse keeper.',
    sampling: { replay_output_tokens: 2000 },
  });
  const jobId = submitted.job_id;
  const stream = client.Stream({ job_id: jobId, from_index: 0 });
  let seen = 0;
  let cancelReply = null;
  const summary = await readEvents(stream, () => {
    seen += 1;
    if (seen === 5) {
      unary(client, 'Cancel', { job_id: jobId }).then((reply) => { cancelReply = reply; });
    }
  });
  const job = await unary(client, 'GetJob', { job_id: jobId });
  return {
    step: 'submit-stream-cancel',
    job_id: jobId,
    tokens_seen: seen,
    cancelled: cancelReply ? cancelReply.cancelled : null,
    summary_state: summary ? summary.state : null,
    job_state: job.state,
    generated_tokens: Number(job.generated_tokens),
  };
}

async function main() {
  const [command = 'demo', ...rest] = process.argv.slice(2);
  let client;
  try {
    client = schedulerClient();
    if (command === 'generate') {
      const flag = rest.indexOf('--max-new-tokens');
      const maxNewTokens = flag >= 0 ? Number(rest[flag + 1]) : 32;
      const prompt = rest.filter((_, i) => i !== flag && i !== flag + 1).join(' ') || 'Hello';
      console.error(JSON.stringify(await generate(client, prompt, maxNewTokens)));
    } else if (command === 'demo') {
      console.log(JSON.stringify(await generate(client, 'Say hello in five words.', 16)));
      console.log(JSON.stringify(await submitStreamCancel(client)));
    } else {
      console.error('usage: client.js generate PROMPT [--max-new-tokens N] | client.js demo');
      process.exitCode = 2;
    }
  } catch (error) {
    console.error(`error: ${error.code !== undefined ? grpc.status[error.code] : ''} ${error.details || error.message}`);
    process.exitCode = 1;
  } finally {
    if (client) client.close();
  }
}

main();
