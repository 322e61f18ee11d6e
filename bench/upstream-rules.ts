// Upstream Istio ambient's in-pod iptables rules (TCP capture; DNS capture when asked, upstream's
// default since 1.25), as its agent applies them with `iptables-restore --noflush` inside the pod
// netns: the benchmarks' baseline. Written after upstream's rule builder (istio/istio,
// cni/pkg/iptables/iptables.go).

export function upstreamInpodRules(family: 4 | 6, options: { dns?: boolean } = {}): string {
  const probe = family === 4 ? '169.254.7.127/32' : 'fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128';
  const loopback = family === 4 ? '127.0.0.1/32' : '::1/128';
  const tproxyIp = family === 4 ? '127.0.0.1' : '::1';
  // UDP and TCP to port 53 not from ztunnel -> its DNS proxy on 15053.
  const dnsCapture = `-A ISTIO_OUTPUT -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT ! -d ${loopback} -p tcp -m mark ! --mark 0x539/0xfff -m tcp --dport 53 -j REDIRECT --to-ports 15053
`;
  return `*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_PRERT -s ${probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d ${loopback} -i lo -p tcp -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark 0x539/0xfff -j ACCEPT
-A ISTIO_PRERT ! -d ${loopback} -p tcp -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --on-ip ${tproxyIp} --tproxy-mark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -d ${probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT ! -d ${loopback} -o lo -j ACCEPT
${options.dns ? dnsCapture : ''}-A ISTIO_OUTPUT ! -d ${loopback} -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
`;
}

/** The routing upstream adds next to the rules (with `ip`), per family. */
export function upstreamRouteCommands(family: 4 | 6): string[][] {
  const f = family === 4 ? '-4' : '-6';
  const all = family === 4 ? '0.0.0.0/0' : '::/0';
  return [
    ['ip', f, 'rule', 'add', 'fwmark', '0x111/0xfff', 'pref', '32764', 'lookup', '100'],
    ['ip', f, 'route', 'add', 'local', all, 'dev', 'lo', 'table', '100'],
  ];
}
