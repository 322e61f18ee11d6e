// The runtime's side of a burst, as its own process (kubelet and containerd are not the agent): it
// reads CNI ADD invocations as JSON on stdin, execs them all at once, and prints the milliseconds
// from the first spawn to the last exit. Spawning 100 plugins costs the spawning process's event
// loop about as much as the agent's work, so it must not share the agent's.
import { execFile } from 'node:child_process';

interface Invocation {
  plugin: string;
  env: Record<string, string>;
  stdin: string;
}

function exec(i: Invocation): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile(i.plugin, [], { env: i.env }, (err, stdout) =>
      err ? reject(new Error(`${i.env.CNI_ARGS}: ${stdout || err.message}`)) : resolve(),
    );
    child.stdin!.on('error', () => undefined); // a plugin that fails early may not read it
    child.stdin!.end(i.stdin);
  });
}

let input = '';
for await (const chunk of process.stdin) input += String(chunk);
const invocations = JSON.parse(input) as Invocation[];
const t0 = performance.now();
await Promise.all(invocations.map(exec));
process.stdout.write(`${performance.now() - t0}\n`);
