// Runs some of the project's own test files on an older kernel: Debian bookworm's Linux 6.1
// (generic flavour), booted under QEMU (TCG where there is no KVM) with the host's root shared
// read-only over 9p under a tmpfs overlay. The kernel package is fetched with `apt-get download`
// (never installed; cached under /var/tmp/ambient-bpf-old-kernel), unpacked into a temporary
// directory with the initramfs (Debian's busybox-static, /init = init.sh, and the modules the guest
// needs, resolved from each module's own `depends`). The guest has no network device; the results
// come back through a shared directory (one JSON line per test, reporter.ts) and the serial console.
// Every step is bounded in time; QEMU and the temporary files are gone when run() returns or throws.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TEST_PREFIX } from '../helpers/kernel.js';

export const CACHE_DIR = process.env.OLD_KERNEL_CACHE ?? '/var/tmp/ambient-bpf-old-kernel';
const REPO = fileURLToPath(new URL('../../../', import.meta.url)).replace(/\/$/, '');
const INIT = join(REPO, 'test/old-kernel/init.sh');

/** What the guest loads, in dependency order once resolved: virtio + 9p + overlay for its root,
 * veth/tun/dummy and tc's clsact + cls_bpf for the tests, packet sockets for the crafted packets
 * (scapy), the socket-diag modules for `ss`, and
 * nftables' NAT (iptables-nft's MASQUERADE in the probes test's node namespace; libcrc32c, which
 * nf_nat needs, asks for crc32c only as a soft dependency). */
export const GUEST_MODULES = [
  'virtio_pci',
  '9pnet_virtio',
  '9p',
  'overlay',
  'veth',
  'tun',
  'dummy',
  'sch_ingress',
  'cls_bpf',
  'af_packet',
  'inet_diag',
  'tcp_diag',
  'udp_diag',
  'raw_diag',
  'unix_diag',
  'crc32c_generic',
  'nf_tables',
  'nft_compat',
  'nft_chain_nat',
  'nft_masq',
  'xt_MASQUERADE',
  'xt_nat',
  'xt_mark',
  'nf_nat',
];

export interface GuestTest {
  file: string;
  name: string;
  nesting: number;
  result: 'pass' | 'fail' | 'skip';
  skip?: string;
  error?: string;
  ms: number;
}

export interface OldKernelRun {
  kernelPackage: string;
  release: string;
  /** Seconds of guest uptime when the tests started (kernel boot + /init). */
  bootSeconds: number;
  /** Seconds from QEMU's start to the tests' start, and for the whole run, on the host's clock. */
  bootWallSeconds: number;
  wallSeconds: number;
  prepareSeconds: number;
  exitCode: number;
  tests: GuestTest[];
  console: string;
}

export interface RunOptions {
  /** Test files relative to the repository, e.g. dist/test/datapath.test.js. */
  files: string[];
  /** Test names that do not apply to this kernel (tcx on 6.1): the guest skips them, saying so. */
  notApplicable?: string[];
  kernelPackage?: string;
  /** Bound for the kernel and /init to reach the tests. */
  bootTimeoutMs?: number;
  /** Bound for the whole guest, tests included. */
  totalTimeoutMs?: number;
  /** Per-test timeout inside the guest. */
  testTimeoutMs?: number;
  /** Extra modules to load (tests of the harness itself use a missing one). */
  extraModules?: string[];
  /** Kernel image to boot instead of the package's (tests of the harness: one that cannot boot). */
  kernelImage?: string;
  /** A shell command to run in the guest instead of the tests (by hand: run.js --sh 'CMD'). */
  command?: string;
  /** TEST_TIME_SCALE in the guest (test/helpers/wait.ts). */
  timeScale?: number;
  /** Each console line as it arrives. */
  onConsole?: (line: string) => void;
}

/** A failure of one named step of the harness (download, unpack, modules, initramfs, boot, ...). */
export class HarnessError extends Error {
  constructor(
    readonly step: string,
    message: string,
    readonly console = '',
  ) {
    super(`old-kernel harness, step "${step}": ${message}`);
  }
}

function run(step: string, cmd: string, args: string[], opts: { cwd?: string; timeoutMs: number }): string {
  try {
    return execFileSync(cmd, args, {
      cwd: opts.cwd,
      timeout: opts.timeoutMs,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      maxBuffer: 64 << 20,
    });
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new HarnessError(step, `${cmd} ${args.join(' ')}: ${(err.stderr ?? '').trim() || err.message}`);
  }
}

/** The generic 6.1 flavour bookworm's linux-image-amd64 depends on (the cloud flavour has no 9p). */
export function defaultKernelPackage(): string {
  if (process.env.OLD_KERNEL_PACKAGE) return process.env.OLD_KERNEL_PACKAGE;
  const out = run('download', 'apt-cache', ['depends', 'linux-image-amd64'], { timeoutMs: 30_000 });
  const pkg = /Depends: (linux-image-[0-9][^\s]*-amd64)\s/.exec(out)?.[1];
  if (!pkg)
    throw new HarnessError('download', `apt-cache depends linux-image-amd64 names no linux-image-*-amd64:\n${out}`);
  return pkg;
}

/** The package's .deb in the cache, downloaded (not installed) when it is not there yet. */
export function fetchKernelPackage(pkg: string): string {
  mkdirSync(CACHE_DIR, { recursive: true });
  const find = () => readdirSync(CACHE_DIR).find((f) => f.startsWith(`${pkg}_`) && f.endsWith('.deb'));
  if (!find()) run('download', 'apt-get', ['download', '-q', pkg], { cwd: CACHE_DIR, timeoutMs: 300_000 });
  const deb = find();
  if (!deb) throw new HarnessError('download', `apt-get download ${pkg} left no ${pkg}_*.deb in ${CACHE_DIR}`);
  return join(CACHE_DIR, deb);
}

/** A module's `depends=` field from its .modinfo strings (what `modinfo -F depends` prints). */
export function moduleDepends(ko: Buffer): string[] {
  const at = ko.indexOf('\0depends=');
  if (at < 0) return [];
  const end = ko.indexOf(0, at + 1);
  const list = ko.subarray(at + '\0depends='.length, end).toString();
  return list ? list.split(',') : [];
}

const modName = (n: string) => n.replace(/-/g, '_');

/** Every module of `wanted` and what it depends on, dependencies first, as paths under `moduleDir`. */
export function resolveModules(moduleDir: string, wanted: string[]): { name: string; path: string }[] {
  const paths = new Map<string, string>();
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(dir, e.name));
      else if (e.name.endsWith('.ko')) paths.set(modName(e.name.slice(0, -3)), join(dir, e.name));
    }
  };
  walk(moduleDir);
  const builtin = new Set(
    existsSync(join(moduleDir, 'modules.builtin'))
      ? readFileSync(join(moduleDir, 'modules.builtin'), 'utf8')
          .split('\n')
          .filter(Boolean)
          .map((l) => modName(l.replace(/^.*\//, '').replace(/\.ko$/, '')))
      : [],
  );
  const order: { name: string; path: string }[] = [];
  const seen = new Set<string>();
  const visit = (name: string, neededBy: string) => {
    name = modName(name);
    if (seen.has(name)) return;
    seen.add(name);
    const path = paths.get(name);
    if (!path) {
      if (builtin.has(name)) return;
      throw new HarnessError('modules', `module ${name} (${neededBy}) is neither in the kernel package nor built in`);
    }
    for (const dep of moduleDepends(readFileSync(path))) visit(dep, `needed by ${name}`);
    order.push({ name, path });
  };
  for (const m of wanted) visit(m, 'wanted by the guest');
  return order;
}

function isStaticElf(path: string): boolean {
  const b = readFileSync(path);
  if (b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2) return false;
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) if (b.readUInt32LE(phoff + i * phentsize) === 3) return false; // PT_INTERP
  return true;
}

function busyboxStatic(): string {
  for (const p of ['/bin/busybox', '/usr/bin/busybox']) if (existsSync(p) && isStaticElf(p)) return p;
  throw new HarnessError('initramfs', 'no static busybox (/bin/busybox): install busybox-static (scripts/setup.sh)');
}

function qemuBinary(): string {
  for (const dir of (process.env.PATH ?? '/usr/bin').split(':')) {
    const p = join(dir, 'qemu-system-x86_64');
    if (existsSync(p)) return p;
  }
  throw new HarnessError('qemu', 'qemu-system-x86_64 not found: install qemu-system-x86 (scripts/setup.sh)');
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Boots the kernel package under QEMU and runs the test files in the guest. */
export async function runOnOldKernel(opts: RunOptions): Promise<OldKernelRun> {
  const started = Date.now();
  const qemu = qemuBinary();
  const busybox = busyboxStatic();
  if (!existsSync(join(REPO, 'dist/test/old-kernel/reporter.js')))
    throw new HarnessError('prepare', 'dist/ is not built (npm run build)');
  for (const f of opts.files)
    if (!existsSync(join(REPO, f))) throw new HarnessError('prepare', `no test file ${f} in ${REPO}`);
  const kernelPackage = opts.kernelPackage ?? defaultKernelPackage();
  const deb = fetchKernelPackage(kernelPackage);
  const tmp = mkdtempSync(join(tmpdir(), `${TEST_PREFIX}-oldk-`));
  let child: ChildProcess | undefined;
  const killQemu = () => {
    // SIGTERM to `timeout`, which passes it on to QEMU and SIGKILLs it 5 s later if need be.
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  };
  process.once('exit', killQemu);
  try {
    // Unpack what the guest needs: the kernel image and the modules (not firmware, not the drivers
    // of hardware a QEMU guest does not have).
    const unpacked = join(tmp, 'kernel');
    mkdirSync(unpacked);
    const tar = `dpkg-deb --fsys-tarfile ${shellQuote(deb)} | tar -x -C ${shellQuote(unpacked)} --wildcards './boot/vmlinuz-*' './lib/modules/*/modules.builtin' './lib/modules/*/kernel/net/*' './lib/modules/*/kernel/fs/*' './lib/modules/*/kernel/drivers/net/*' './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/lib/*' './lib/modules/*/kernel/crypto/*'`;
    run('unpack', 'sh', ['-c', tar], { timeoutMs: 180_000 });
    const releases = readdirSync(join(unpacked, 'lib/modules'));
    if (releases.length !== 1)
      throw new HarnessError('unpack', `expected one kernel release in ${deb}, found ${releases.join(', ') || 'none'}`);
    const release = releases[0]!;
    const image = opts.kernelImage ?? join(unpacked, 'boot', `vmlinuz-${release}`);
    if (!existsSync(image)) throw new HarnessError('unpack', `no kernel image ${image}`);
    const kernel = join(tmp, 'vmlinuz');
    copyFileSync(image, kernel);
    const modules = resolveModules(join(unpacked, 'lib/modules', release), [
      ...GUEST_MODULES,
      ...(opts.extraModules ?? []),
    ]);

    // The initramfs: busybox, /init, the modules and their load order, the guest's settings.
    const root = join(tmp, 'initramfs');
    mkdirSync(join(root, 'bin'), { recursive: true });
    mkdirSync(join(root, 'modules'));
    copyFileSync(busybox, join(root, 'bin/busybox'));
    chmodSync(join(root, 'bin/busybox'), 0o755);
    copyFileSync(INIT, join(root, 'init'));
    chmodSync(join(root, 'init'), 0o755);
    writeFileSync(join(root, 'modprobe-log'), '#!/bin/busybox sh\necho "OLDK modprobe $*" > /dev/console\nexit 1\n', {
      mode: 0o755,
    });
    for (const m of modules) copyFileSync(m.path, join(root, 'modules', `${m.name}.ko`));
    writeFileSync(join(root, 'modules.order'), modules.map((m) => m.name).join('\n') + '\n');
    const env: Record<string, string> = {
      PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
      HOME: '/root',
      OLDK_REPO: REPO,
      OLDK_FILES: opts.files.join(' '),
      OLDK_COMMAND: opts.command ?? '',
      OLDK_TEST_TIMEOUT_MS: String(opts.testTimeoutMs ?? 600_000),
      OLD_KERNEL_NOT_APPLICABLE: JSON.stringify(opts.notApplicable ?? []),
      TEST_NAME_PREFIX: TEST_PREFIX,
      CI: process.env.CI ?? '',
      // Under TCG everything is many times slower than on the host (the agent's first start, Node and
      // its modules read over 9p, took about 100 s on a loaded machine): bounded waits stretch.
      TEST_TIME_SCALE: String(opts.timeScale ?? (existsSync('/dev/kvm') ? 2 : 12)),
      NO_COLOR: '1',
    };
    writeFileSync(
      join(root, 'guest.env'),
      Object.entries(env)
        .map(([k, v]) => `export ${k}=${shellQuote(v)}`)
        .join('\n') + '\n',
    );
    const initrd = join(tmp, 'initrd.cpio');
    run(
      'initramfs',
      'sh',
      ['-c', `cd ${shellQuote(root)} && find . | ${shellQuote(busybox)} cpio -o -H newc > ${shellQuote(initrd)}`],
      { timeoutMs: 60_000 },
    );
    rmSync(unpacked, { recursive: true, force: true });
    const results = join(tmp, 'results');
    mkdirSync(results);
    const prepareSeconds = (Date.now() - started) / 1000;

    // Boot. No network device, no disk: the host's root (read-only) and the results directory.
    const totalTimeoutMs = opts.totalTimeoutMs ?? 900_000;
    const bootTimeoutMs = opts.bootTimeoutMs ?? 180_000;
    // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic.
    const args = [
      '-machine',
      'pc',
      '-accel',
      existsSync('/dev/kvm') ? 'kvm' : 'tcg,thread=multi',
      '-cpu',
      'max',
      '-smp',
      '2',
      '-m',
      '2048',
      '-nodefaults',
      '-no-reboot',
      '-display',
      'none',
      '-serial',
      'stdio',
      '-kernel',
      kernel,
      '-initrd',
      initrd,
      '-append',
      'console=ttyS0 panic=-1 oops=panic no_timer_check quiet loglevel=4 rdinit=/init',
      '-virtfs',
      'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
      '-virtfs',
      `local,path=${results},mount_tag=results,security_model=none`,
    ];
    const qemuStarted = Date.now();
    // `timeout` bounds QEMU even if this process dies without its exit handler (SIGKILL).
    child = spawn('timeout', ['-k', '5', String(Math.ceil(totalTimeoutMs / 1000) + 10), qemu, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let consoleText = '';
    let step = 'boot';
    let failed: string | undefined;
    let releaseSeen = '';
    let bootSeconds = NaN;
    let bootWallSeconds = NaN;
    let testsEnded = false;
    let partial = '';
    const onData = (d: Buffer) => {
      partial += d.toString().replace(/\r/g, '');
      const lines = partial.split('\n');
      partial = lines.pop()!;
      for (const line of lines) {
        consoleText += `${line}\n`;
        opts.onConsole?.(line);
        if (/Kernel panic - not syncing/.test(line) && !failed)
          failed = `${step}: kernel panic: ${line.replace(/^\[[^\]]*\] */, '')}`;
        const m = /^OLDK (\S+) ?(.*)$/.exec(line);
        if (!m) continue;
        if (m[1] === 'step') step = m[2]!;
        else if (m[1] === 'fail') failed = m[2];
        else if (m[1] === 'release') releaseSeen = m[2]!;
        else if (m[1] === 'tests-start') {
          bootSeconds = Number(m[2]);
          bootWallSeconds = (Date.now() - qemuStarted) / 1000;
        } else if (m[1] === 'tests-end') testsEnded = true;
      }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    const exited = new Promise<number>((resolve) =>
      child!.once('exit', (code, signal) => resolve(code ?? (signal ? 128 : 1))),
    );
    let timedOut: string | undefined;
    const bootTimer = setTimeout(() => {
      if (Number.isNaN(bootSeconds)) {
        timedOut = `the guest did not reach the tests within ${bootTimeoutMs / 1000} s`;
        killQemu();
      }
    }, bootTimeoutMs);
    const totalTimer = setTimeout(() => {
      timedOut = `the guest did not finish within ${totalTimeoutMs / 1000} s`;
      killQemu();
    }, totalTimeoutMs);
    const exitCode = await exited;
    clearTimeout(bootTimer);
    clearTimeout(totalTimer);
    if (partial) consoleText += partial;
    const tail = consoleText.split('\n').slice(-40).join('\n');
    if (failed)
      throw new HarnessError(
        failed.split(':')[0]!,
        `the guest failed: ${failed}\n--- console (last lines) ---\n${tail}`,
        consoleText,
      );
    if (timedOut) {
      // What finished before the guest was stopped (the reporter writes each test as it ends).
      const done = existsSync(join(results, 'results.jsonl'))
        ? readFileSync(join(results, 'results.jsonl'), 'utf8')
            .split('\n')
            .filter(Boolean)
            .map((l) => JSON.parse(l) as GuestTest)
        : [];
      const summary = done
        .filter((t) => t.nesting === 0)
        .map((t) => `${t.result} ${t.file.replace(`${REPO}/`, '')} › ${t.name} (${Math.round(t.ms / 1000)} s)`)
        .join('\n');
      throw new HarnessError(
        step,
        `${timedOut} (QEMU killed)\n--- finished before that ---\n${summary || '(nothing)'}\n--- console (last lines) ---\n${tail}`,
        consoleText,
      );
    }
    if (!testsEnded)
      throw new HarnessError(
        step,
        `QEMU exited (${exitCode}) before the tests ended\n--- console (last lines) ---\n${tail}`,
        consoleText,
      );
    const rcFile = join(results, 'rc');
    const jsonl = join(results, 'results.jsonl');
    if (!existsSync(rcFile) || !existsSync(jsonl))
      throw new HarnessError(
        'results',
        `the guest wrote no results\n--- console (last lines) ---\n${tail}`,
        consoleText,
      );
    const tests = readFileSync(jsonl, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as GuestTest);
    for (const t of tests) t.file = t.file ? t.file.replace(`${REPO}/`, '') : '';
    return {
      kernelPackage,
      release: releaseSeen,
      bootSeconds,
      bootWallSeconds,
      wallSeconds: (Date.now() - started) / 1000,
      prepareSeconds,
      exitCode: Number(readFileSync(rcFile, 'utf8').trim()),
      tests,
      console: consoleText,
    };
  } finally {
    process.removeListener('exit', killQemu);
    killQemu();
    if (child && child.exitCode === null && child.signalCode === null) await new Promise((r) => child!.once('exit', r));
    rmSync(tmp, { recursive: true, force: true });
  }
}
