// The agent's Kubernetes client against a real HTTPS server with a CA made here (openssl): the
// in-cluster service account (token re-read after rotation), kubeconfig tokens, client
// certificates with paths relative to the kubeconfig, an exec credential plugin (through
// client-node), a CA that does not match, and configuration errors that say what is wrong.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import {
  inClusterConnection,
  KubeClient,
  KubeConfigError,
  kubeconfigConnection,
} from '../cni-agent/src/pods/kube-client.js';
import { TEST_PREFIX } from './helpers/kernel.js';
import { sleep } from './helpers/wait.js';

const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-kube-client-`));
const file = (name: string) => join(dir, name);

/** A CA, a server certificate for 127.0.0.1 and a client certificate (CN ambient-bpf) it signed. */
async function makeCertificates(): Promise<void> {
  const openssl = (...args: string[]) => run('openssl', args, { cwd: dir });
  await openssl(
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    'ca.key',
    '-out',
    'ca.crt',
    '-days',
    '1',
    '-subj',
    '/CN=test-ca',
  );
  for (const [name, subject, ext] of [
    ['server', '/CN=apiserver', 'subjectAltName=IP:127.0.0.1'],
    ['client', '/CN=ambient-bpf', 'extendedKeyUsage=clientAuth'],
  ] as const) {
    await openssl(
      'req',
      '-new',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-keyout',
      `${name}.key`,
      '-out',
      `${name}.csr`,
      '-subj',
      subject,
    );
    writeFileSync(file(`${name}.ext`), `${ext}\n`);
    await openssl(
      'x509',
      '-req',
      '-in',
      `${name}.csr`,
      '-CA',
      'ca.crt',
      '-CAkey',
      'ca.key',
      '-CAcreateserial',
      '-out',
      `${name}.crt`,
      '-days',
      '1',
      '-extfile',
      `${name}.ext`,
    );
  }
  // A second CA that signed nothing here.
  await openssl(
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    'other.key',
    '-out',
    'other.crt',
    '-days',
    '1',
    '-subj',
    '/CN=other-ca',
  );
}

/** An API server that answers a namespace list with who it took the caller for. */
let server: https.Server;
let port = 0;
function who(req: import('node:http').IncomingMessage): string {
  const cert = (req.socket as TLSSocket).getPeerCertificate();
  const cn = cert.subject?.CN;
  return cn ? `cert:${String(cn)}` : (req.headers.authorization ?? 'anonymous');
}

const kubeconfig = (
  name: string,
  user: object,
  cluster: object = { server: `https://127.0.0.1:${port}`, 'certificate-authority': 'ca.crt' },
) => {
  writeFileSync(
    file(name),
    JSON.stringify({
      apiVersion: 'v1',
      kind: 'Config',
      'current-context': 'c',
      contexts: [{ name: 'c', context: { cluster: 'k', user: 'u' } }],
      clusters: [{ name: 'k', cluster }],
      users: [{ name: 'u', user }],
    }),
  );
  return file(name);
};
async function whoAmI(client: KubeClient): Promise<string> {
  try {
    const { items } = await client.list<{ metadata: { name: string } }>('/api/v1/namespaces');
    return items[0]!.metadata.name;
  } finally {
    client.close();
  }
}

describe('Kubernetes client', () => {
  before(async () => {
    await makeCertificates();
    server = https.createServer(
      {
        key: readFileSync(file('server.key')),
        cert: readFileSync(file('server.crt')),
        ca: readFileSync(file('ca.crt')),
        requestCert: true,
        rejectUnauthorized: false,
      },
      (req, res) => {
        res.writeHead(200, { 'content-type': 'application/json' }).end(
          JSON.stringify({
            kind: 'NamespaceList',
            metadata: { resourceVersion: '7' },
            items: [{ metadata: { name: who(req) } }],
          }),
        );
      },
    );
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as AddressInfo).port;
  });
  after(() => {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('in cluster: the service account token over the cluster CA, re-read once rotated', async () => {
    const sa = mkdtempSync(join(dir, 'sa-'));
    writeFileSync(join(sa, 'ca.crt'), readFileSync(file('ca.crt')));
    writeFileSync(join(sa, 'token'), 'first\n');
    const conn = inClusterConnection({
      env: { KUBERNETES_SERVICE_HOST: '127.0.0.1', KUBERNETES_SERVICE_PORT: String(port) },
      dir: sa,
      tokenRereadMs: 50,
    });
    assert.equal(await whoAmI(new KubeClient(conn)), 'Bearer first');
    writeFileSync(join(sa, 'token'), 'second\n');
    await sleep(80);
    assert.equal(await whoAmI(new KubeClient(conn)), 'Bearer second');
  });

  it('in cluster without the service environment: an error that says what to pass', () => {
    assert.throws(
      () => inClusterConnection({ env: {} }),
      (e: Error) => e instanceof KubeConfigError && /--kubeconfig/.test(e.message),
    );
  });

  it('kubeconfig: token, client certificate (paths relative to the file), basic auth', async () => {
    assert.equal(
      await whoAmI(new KubeClient(await kubeconfigConnection(kubeconfig('token.yaml', { token: 'abc' })))),
      'Bearer abc',
    );
    assert.equal(
      await whoAmI(
        new KubeClient(
          await kubeconfigConnection(
            kubeconfig('cert.yaml', { 'client-certificate': 'client.crt', 'client-key': 'client.key' }),
          ),
        ),
      ),
      'cert:ambient-bpf',
    );
    const basic = await kubeconfigConnection(
      kubeconfig(
        'basic.yaml',
        { username: 'u', password: 'p' },
        {
          server: `https://127.0.0.1:${port}`,
          'certificate-authority-data': readFileSync(file('ca.crt')).toString('base64'),
        },
      ),
    );
    assert.equal(await whoAmI(new KubeClient(basic)), `Basic ${Buffer.from('u:p').toString('base64')}`);
  });

  it('kubeconfig with an exec credential plugin: through client-node', async () => {
    const credential = JSON.stringify({
      apiVersion: 'client.authentication.k8s.io/v1',
      kind: 'ExecCredential',
      status: { token: 'from-exec' },
    });
    const exec = {
      apiVersion: 'client.authentication.k8s.io/v1',
      command: 'sh',
      args: ['-c', `echo '${credential}'`],
      interactiveMode: 'Never',
    };
    assert.equal(
      await whoAmI(new KubeClient(await kubeconfigConnection(kubeconfig('exec.yaml', { exec })))),
      'Bearer from-exec',
    );
  });

  it('refuses a server its CA did not sign', async () => {
    const conn = await kubeconfigConnection(
      kubeconfig(
        'other-ca.yaml',
        { token: 'abc' },
        { server: `https://127.0.0.1:${port}`, 'certificate-authority': 'other.crt' },
      ),
    );
    await assert.rejects(whoAmI(new KubeClient(conn)), /self[- ]signed|unable to verify|certificate/i);
  });

  it('says what is wrong with a kubeconfig', async () => {
    writeFileSync(file('no-context.yaml'), 'apiVersion: v1\nkind: Config\nclusters: []\n');
    await assert.rejects(kubeconfigConnection(file('no-context.yaml')), /no current-context/);
    await assert.rejects(kubeconfigConnection(file('missing.yaml')), /cannot read kubeconfig .*missing\.yaml/);
    await assert.rejects(
      kubeconfigConnection(
        kubeconfig(
          'bad-ca.yaml',
          { token: 'x' },
          { server: 'https://127.0.0.1:1', 'certificate-authority': 'nope.crt' },
        ),
      ),
      /nope\.crt/,
    );
  });
});
