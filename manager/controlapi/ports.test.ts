/**
 * Published ports through the control API (in-process, real store): allocation persisted with the
 * service, the ingress network created and attached last, a taken port or a refused create leaving
 * nothing behind (not even the ingress network), ports freed by --publish-rm and by service removal.
 */
import { describe, expect, it } from 'vitest';
import { EndpointMode, PortProtocol, PublishMode, type PortConfig, type ServiceSpec } from '../../gen/flotilla/v1/objects.js';
import { createLogger } from '../../common/log.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import type { Dispatcher } from '../dispatcher/dispatcher.js';
import { testNode, testSpec } from '../../testing/testutil.js';
import { ControlApi } from './server.js';
import { ingressNetwork } from './ingress.js';

const log = createLogger('test');
log.level = 'silent';

function setup(): { store: MemoryStore; api: ControlApi } {
  const store = new MemoryStore(log);
  store.setProposer(new MemoryProposer(store));
  return { store, api: new ControlApi({ store, dispatcher: undefined as unknown as Dispatcher, leaderAddr: () => '', readBarrier: async () => {} }) };
}
const port = (published: number, target: number): PortConfig => ({
  name: '',
  protocol: PortProtocol.PORT_PROTOCOL_TCP,
  targetPort: target,
  publishedPort: published,
  publishMode: PublishMode.PUBLISH_MODE_INGRESS,
  localOnly: false,
});
const withPorts = (name: string, ports: PortConfig[]): ServiceSpec => ({ ...testSpec(name, 1), endpoint: { mode: EndpointMode.ENDPOINT_MODE_VIP, ports } });

describe('published ports in the control API', () => {
  it('allocates, attaches the ingress network last, refuses a taken port naming the service, frees ports', async () => {
    const { store, api } = setup();
    const { service: web } = await api.createService({ spec: withPorts('web', [port(8080, 80), port(0, 81)]), noResolveImage: false });
    expect(web!.endpoint!.ports.map((p) => p.publishedPort)).toEqual([8080, 30000]);
    expect(web!.spec!.endpoint!.ports.map((p) => p.publishedPort)).toEqual([8080, 0]);
    const ing = ingressNetwork(store)!;
    expect(ing.spec!.name).toBe('ingress');
    expect(ing.allocation!.subnet).toBe('10.255.0.0/16');
    expect(web!.spec!.task!.networks.map((n) => n.target)).toEqual([ing.id]);

    await expect(api.createService({ spec: withPorts('thief', [port(8080, 80)]), noResolveImage: false })).rejects.toThrow('published port 8080/tcp is already used by service web');
    expect(store.serviceByName('thief')).toBeUndefined();

    // an update keeps the allocated port; removing every port detaches the ingress network
    const kept = await api.updateService({ serviceId: 'web', version: 0, spec: withPorts('web', [port(8080, 80), port(0, 81)]), rollback: '', toVersion: 0, dryRun: false, noResolveImage: false });
    expect(kept.service!.endpoint!.ports.map((p) => p.publishedPort)).toEqual([8080, 30000]);
    const none = await api.updateService({ serviceId: 'web', version: 0, spec: withPorts('web', []), rollback: '', toVersion: 0, dryRun: false, noResolveImage: false });
    expect(none.service!.endpoint!.ports).toEqual([]);
    expect(none.service!.spec!.task!.networks).toEqual([]);
    // 8080 is free again
    const { service: next } = await api.createService({ spec: withPorts('next', [port(8080, 80)]), noResolveImage: false });
    expect(next!.endpoint!.ports[0]!.publishedPort).toBe(8080);
    await api.removeService('next');
    const { service: again } = await api.createService({ spec: withPorts('again', [port(8080, 80)]), noResolveImage: false });
    expect(again!.endpoint!.ports[0]!.publishedPort).toBe(8080);
  });

  it('a refused create makes no ingress network', async () => {
    const { store, api } = setup();
    await api.createService({ spec: testSpec('web', 1), noResolveImage: false });
    await expect(api.createService({ spec: withPorts('web', [port(8080, 80)]), noResolveImage: false })).rejects.toThrow(/already exists/);
    await expect(api.createService({ spec: withPorts('bad', [port(8080, 80), port(8080, 81)]), noResolveImage: false })).rejects.toThrow('invalid publish "8080/tcp": published port given twice');
    expect(store.networks.size).toBe(0);
  });
});

describe('createService checks before pinning', () => {
  it('a duplicate name or a taken port is refused before a registry is asked for the digest', async () => {
    const store = new MemoryStore(log);
    store.setProposer(new MemoryProposer(store));
    const asked: string[] = [];
    const api = new ControlApi({
      store,
      // the one node has a real image store and reports no image of that name: pinning asks the registry
      dispatcher: { localImageDigests: () => new Set<string>() } as unknown as Dispatcher,
      leaderAddr: () => '',
      readBarrier: async () => {},
      resolveImage: async (ref) => {
        asked.push(ref);
        return `sha256:${'a'.repeat(64)}`;
      },
    });
    const node = testNode('h1');
    await store.update((tx) => tx.create('node', { ...node, description: { ...node.description!, runtime: 'runc' } }));
    const { service } = await api.createService({ spec: withPorts('web', [port(8080, 80)]), noResolveImage: false });
    expect(service!.spec!.task!.container!.image).toBe(`busybox:latest@sha256:${'a'.repeat(64)}`);
    expect(asked).toHaveLength(1);
    await expect(api.createService({ spec: testSpec('web', 1), noResolveImage: false })).rejects.toThrow(/already exists/);
    await expect(api.createService({ spec: withPorts('thief', [port(8080, 80)]), noResolveImage: false })).rejects.toThrow(/already used by service web/);
    expect(asked).toHaveLength(1);
  });
});
