import { describe, expect, it } from 'vitest';
import { NetworkPeer, NetworkView, ServiceEndpoint } from '../../gen/flotilla/v1/dispatcher.js';
import { PortProtocol, PublishMode } from '../../gen/flotilla/v1/objects.js';
import { portRules, publishesAny, renderPorts } from './ports.js';

const peer = (taskId: string, nodeId: string, ip: string, serviceId: string, ready = true): NetworkPeer =>
  NetworkPeer.fromPartial({ taskId, nodeId, nodeAddr: `192.0.2.${nodeId.slice(1)}`, address: `${ip}/16`, serviceId, ready });
const port = (published: number, target: number, o: { udp?: boolean; host?: boolean; local?: boolean } = {}) => ({
  name: '',
  protocol: o.udp ? PortProtocol.PORT_PROTOCOL_UDP : PortProtocol.PORT_PROTOCOL_TCP,
  targetPort: target,
  publishedPort: published,
  publishMode: o.host ? PublishMode.PUBLISH_MODE_HOST : PublishMode.PUBLISH_MODE_INGRESS,
  localOnly: !!o.local,
});

function view(): NetworkView {
  return NetworkView.fromPartial({
    peers: [
      peer('a1', 'n1', '10.255.0.5', 'A'),
      peer('a2', 'n2', '10.255.0.6', 'A'),
      peer('a3', 'n2', '10.255.0.7', 'A', false), // not ready: never a backend
      peer('b1', 'n2', '10.255.0.8', 'B'),
      NetworkPeer.fromPartial({ nodeId: 'n2', nodeAddr: '192.0.2.2', address: '10.255.0.250/16', nodeAddress: true }),
    ],
    endpoints: [
      ServiceEndpoint.fromPartial({ serviceId: 'A', ports: [port(8080, 80), port(5353, 53, { udp: true }), port(8081, 80, { local: true })] }),
      ServiceEndpoint.fromPartial({ serviceId: 'B', ports: [port(8082, 80, { host: true })] }),
    ],
  });
}
const onN1 = (p: NetworkPeer): boolean => p.nodeId === 'n1';
const onN2 = (p: NetworkPeer): boolean => p.nodeId === 'n2';

describe('published ports: rules of a node', () => {
  it('cluster ports use every ready task, local ones and host mode only this node’s; remote backends are SNATed', () => {
    const { rules, remote } = portRules(view(), onN1);
    expect(rules.map((r) => `${r.protocol}/${r.published}->${r.target} ${r.backends.join(',')}${r.local ? ' local' : ''}`)).toEqual([
      'tcp/8080->80 10.255.0.5,10.255.0.6',
      'tcp/8081->80 10.255.0.5 local',
      'udp/5353->53 10.255.0.5,10.255.0.6',
    ]);
    // host mode port 8082: B runs no task on n1, so no rule there
    expect(remote).toEqual(['10.255.0.6']);
    const n2 = portRules(view(), onN2);
    expect(n2.rules.find((r) => r.published === 8082)?.backends).toEqual(['10.255.0.8']);
    expect(n2.rules.find((r) => r.published === 8081)?.backends).toEqual(['10.255.0.6']);
    expect(n2.remote).toEqual(['10.255.0.5']);
  });
  it('without its own ingress address a node keeps every port to its local tasks', () => {
    const { rules, remote } = portRules(view(), onN1, false);
    expect(rules.find((r) => r.published === 8080)?.backends).toEqual(['10.255.0.5']);
    expect(remote).toEqual([]);
  });
  it('renders one table: the port map, a DNAT chain per port with backends, SNAT only towards @remote and loopback', () => {
    const { rules, remote } = portRules(view(), onN1);
    const text = renderPorts(rules, remote, 'fl-br-4096', '10.255.0.250');
    expect(text).toContain('elements = { tcp . 8080 : goto port_0, tcp . 8081 : goto port_1, udp . 5353 : goto port_2 }');
    expect(text).toContain('meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.255.0.5, 1 : 10.255.0.6 } : 80');
    expect(text).toContain('meta l4proto tcp dnat to 10.255.0.5 : 80');
    expect(text).toContain('oifname "fl-br-4096" ct status dnat ip daddr @remote snat to 10.255.0.250');
    expect(text).toContain('elements = { 10.255.0.6 }');
    expect(publishesAny(view())).toBe(true);
    expect(publishesAny(NetworkView.fromPartial({ endpoints: [ServiceEndpoint.fromPartial({ serviceId: 'A' })] }))).toBe(false);
  });
});
