/**
 * Secrets and configs through the control API, over real gRPC: validation (names, sizes, labels),
 * data never returned for secrets (returned for configs on Get only), references in service specs
 * resolved by name to ids with defaults, unknown names and clashing targets refused, and removal
 * refused while a service uses the object.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient, ControlService } from '../../gen/flotilla/v1/control.js';
import { ServiceSpec, type Config, type Secret, type Service } from '../../gen/flotilla/v1/objects.js';
import { createLogger } from '../../common/log.js';
import { MAX_SECRET_BYTES } from '../../common/secrets.js';
import { MemoryStore } from '../store/store.js';
import { MemoryProposer } from '../store/memory-proposer.js';
import type { Dispatcher } from '../dispatcher/dispatcher.js';
import { testService, testSpec } from '../../testing/testutil.js';
import { ControlApi } from './server.js';

const log = createLogger('test');
log.level = 'silent';

type Err = grpc.ServiceError;

describe('secrets and configs in the control API', () => {
  const store = new MemoryStore(log);
  store.setProposer(new MemoryProposer(store));
  const api = new ControlApi({ store, dispatcher: undefined as unknown as Dispatcher, leaderAddr: () => '', readBarrier: async () => {} });
  const server = new grpc.Server();
  let client: ControlClient;

  /** Calls a unary method; resolves its response or the gRPC error. */
  function call<Res>(method: string, req: unknown): Promise<{ res?: Res; err?: Err }> {
    return new Promise((resolve) => {
      (client as unknown as Record<string, (r: unknown, cb: (e: Err | null, r: Res) => void) => void>)[method]!(req, (err, res) => resolve(err ? { err } : { res }));
    });
  }

  const secretSpec = (name: string, data: string | Buffer, labels: Record<string, string> = {}) => ({ spec: { name, labels, data: Buffer.from(data) } });
  const withSecrets = (name: string, secrets: Array<{ name: string; target?: string; mode?: number; uid?: number }>, configs: Array<{ name: string; target?: string }> = []): ServiceSpec => {
    const spec = testSpec(name, 1);
    spec.task!.container!.secrets = secrets.map((s) => ({ secretId: '', secretName: s.name, file: { name: s.target ?? '', uid: s.uid ?? 0, gid: 0, mode: s.mode ?? 0o444 } }));
    spec.task!.container!.configs = configs.map((c) => ({ configId: '', configName: c.name, file: { name: c.target ?? '', uid: 0, gid: 0, mode: 0o444 } }));
    return spec;
  };

  beforeAll(async () => {
    server.addService(ControlService, api.server());
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    client = new ControlClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': 8 * 1024 * 1024 });
  });
  afterAll(() => {
    client.close();
    server.forceShutdown();
  });

  it('creates a secret and never returns its data; a config returns its data on Get only', async () => {
    const created = await call<{ secret: Secret }>('createSecret', secretSpec('db-password', 'hunter2-value', { env: 'prod' }));
    expect(created.err).toBeUndefined();
    expect(created.res!.secret.spec!.name).toBe('db-password');
    expect(created.res!.secret.spec!.labels).toEqual({ env: 'prod' });
    expect(created.res!.secret.spec!.data).toHaveLength(0);
    // the store has it
    expect(Buffer.from(store.secrets.get(created.res!.secret.id)!.spec!.data).toString()).toBe('hunter2-value');
    const got = await call<{ secret: Secret }>('getSecret', { secretId: 'db-password' });
    expect(got.res!.secret.id).toBe(created.res!.secret.id);
    expect(got.res!.secret.spec!.data).toHaveLength(0);
    const byPrefix = await call<{ secret: Secret }>('getSecret', { secretId: created.res!.secret.id.slice(0, 8) });
    expect(byPrefix.res!.secret.spec!.data).toHaveLength(0);
    const listed = await call<{ secrets: Secret[] }>('listSecrets', {});
    expect(listed.res!.secrets.map((s) => s.spec!.name)).toEqual(['db-password']);
    expect(listed.res!.secrets.every((s) => s.spec!.data.length === 0)).toBe(true);

    const cfg = await call<{ config: Config }>('createConfig', { spec: { name: 'app.conf', labels: {}, data: Buffer.from('port=80\n') } });
    expect(cfg.res!.config.spec!.data).toHaveLength(0);
    const cfgGot = await call<{ config: Config }>('getConfig', { configId: 'app.conf' });
    expect(Buffer.from(cfgGot.res!.config.spec!.data).toString()).toBe('port=80\n');
    const cfgList = await call<{ configs: Config[] }>('listConfigs', {});
    expect(cfgList.res!.configs.every((c) => c.spec!.data.length === 0)).toBe(true);
  });

  it('refuses bad names, empty and oversized values, bad labels and duplicates, creating nothing', async () => {
    const before = store.secrets.size;
    for (const name of ['', 'bad name', '-dash', '.dot', 'a/b', 'x'.repeat(65), 'é']) {
      const r = await call('createSecret', secretSpec(name, 'v'));
      expect(r.err?.code, name).toBe(grpc.status.INVALID_ARGUMENT);
      expect(r.err?.details).toMatch(/invalid secret name/);
    }
    expect((await call('createSecret', secretSpec('x'.repeat(64), 'v'))).err).toBeUndefined();
    await call('removeSecret', { secretId: 'x'.repeat(64) });

    const empty = await call('createSecret', secretSpec('empty', ''));
    expect(empty.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(empty.err?.details).toMatch(/empty/);

    const big = Buffer.alloc(MAX_SECRET_BYTES + 1, 'S');
    const tooBig = await call('createSecret', secretSpec('big', big));
    expect(tooBig.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(tooBig.err?.details).toBe(`invalid secret data: ${MAX_SECRET_BYTES + 1} bytes, over the limit of ${MAX_SECRET_BYTES} bytes (500 KiB)`);
    const cfgBig = await call('createConfig', { spec: { name: 'big', labels: {}, data: big } });
    expect(cfgBig.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect((await call('createSecret', secretSpec('big', big.subarray(1)))).err).toBeUndefined();

    const label = await call('createSecret', secretSpec('labelled', 'v', { 'bad key': 'x' }));
    expect(label.err?.code).toBe(grpc.status.INVALID_ARGUMENT);

    const dup = await call('createSecret', secretSpec('db-password', 'other'));
    expect(dup.err?.code).toBe(grpc.status.ALREADY_EXISTS);
    expect(dup.err?.details).toBe('secret "db-password" already exists');
    // one name per kind: a config may share a secret's name
    expect((await call('createConfig', { spec: { name: 'db-password', labels: {}, data: Buffer.from('x') } })).err).toBeUndefined();
    await call('removeConfig', { configId: 'db-password' });

    expect(store.secrets.size).toBe(before + 1); // only 'big' (the one at the limit)
    await call('removeSecret', { secretId: 'big' });
  });

  it('resolves references by name to ids, with default targets and modes', async () => {
    const res = await call<{ service: Service }>('createService', { spec: withSecrets('web', [{ name: 'db-password' }, { name: 'db-password', target: 'copy', mode: 0o400, uid: 33 }], [{ name: 'app.conf' }]) });
    expect(res.err).toBeUndefined();
    const c = res.res!.service.spec!.task!.container!;
    const sid = store.secrets.values().next().value!.id;
    expect(c.secrets).toEqual([
      { secretId: sid, secretName: 'db-password', file: { name: 'db-password', uid: 0, gid: 0, mode: 0o444 } },
      { secretId: sid, secretName: 'db-password', file: { name: 'copy', uid: 33, gid: 0, mode: 0o400 } },
    ]);
    expect(c.configs[0]!.file!.name).toBe('/app.conf');
    expect(c.configs[0]!.configId).toBe([...store.configs.values()][0]!.id);
  });

  it('refuses unknown names, clashing and bad targets, creating nothing', async () => {
    const before = store.services.size;
    const unknown = await call('createService', { spec: withSecrets('svc1', [{ name: 'nope' }]) });
    expect(unknown.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(unknown.err?.details).toBe('invalid secret "nope": secret not found (create it with flotilla secret create)');
    const unknownCfg = await call('createService', { spec: withSecrets('svc1', [], [{ name: 'nope.conf' }]) });
    expect(unknownCfg.err?.details).toMatch(/invalid config "nope.conf": config not found/);
    const clash = await call('createService', { spec: withSecrets('svc1', [{ name: 'db-password' }, { name: 'db-password', target: '/run/secrets/db-password' }]) });
    expect(clash.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(clash.err?.details).toMatch(/target "\/run\/secrets\/db-password": is already the target of secret db-password/);
    const secretVsConfig = await call('createService', { spec: withSecrets('svc1', [{ name: 'db-password', target: '/etc/x' }], [{ name: 'app.conf', target: '/etc/x' }]) });
    expect(secretVsConfig.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    for (const target of ['../etc/passwd', 'a/../b', '/proc/x', '/dev/null', '/etc/', '/']) {
      const bad = await call('createService', { spec: withSecrets('svc1', [{ name: 'db-password', target }]) });
      expect(bad.err?.code, target).toBe(grpc.status.INVALID_ARGUMENT);
      expect(bad.err?.details, target).toMatch(/invalid --secret db-password target/);
    }
    const relCfg = await call('createService', { spec: withSecrets('svc1', [], [{ name: 'app.conf', target: 'etc/app.conf' }]) });
    expect(relCfg.err?.details).toBe('invalid --config app.conf target "etc/app.conf": must be an absolute path');
    const mode = await call('createService', { spec: withSecrets('svc1', [{ name: 'db-password', mode: 0o1777 }]) });
    expect(mode.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(store.services.size).toBe(before);
  });

  it('refuses to remove a secret or config while a service uses it, naming the service', async () => {
    const rm = await call('removeSecret', { secretId: 'db-password' });
    expect(rm.err?.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(rm.err?.details).toBe('secret "db-password" is in use by service web: remove it from it first (service update --secret-rm db-password)');
    const rmCfg = await call('removeConfig', { configId: 'app.conf' });
    expect(rmCfg.err?.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(rmCfg.err?.details).toMatch(/config "app.conf" is in use by service web/);
    expect(store.secrets.size).toBe(1);
    const missing = await call('removeSecret', { secretId: 'nope' });
    expect(missing.err?.code).toBe(grpc.status.NOT_FOUND);
  });

  it('swaps a secret in one update (rm old + add new at the same target), then the old one can go', async () => {
    await call('createSecret', secretSpec('db-password-v2', 'new-value'));
    const svc = store.serviceByName('web')!;
    const spec = structuredClone(svc.spec!);
    const c = spec.task!.container!;
    c.secrets = c.secrets.filter((r) => r.secretName !== 'db-password');
    c.secrets.push({ secretId: '', secretName: 'db-password-v2', file: { name: 'db-password', uid: 0, gid: 0, mode: 0o400 } });
    c.configs = [];
    const up = await call<{ service: Service }>('updateService', { serviceId: 'web', version: svc.specVersion, spec, rollback: '', toVersion: 0, dryRun: false });
    expect(up.err).toBeUndefined();
    expect(up.res!.service.spec!.task!.container!.secrets.map((r) => [r.secretName, r.file!.name])).toEqual([['db-password-v2', 'db-password']]);
    expect(up.res!.service.updateStatus?.message).toBe('update in progress');
    expect((await call('removeSecret', { secretId: 'db-password' })).err).toBeUndefined();
    expect((await call('removeConfig', { configId: 'app.conf' })).err).toBeUndefined();
    // a rollback to the spec that named the removed secret is refused, naming it
    const back = await call('updateService', { serviceId: 'web', version: 0, rollback: 'previous', toVersion: 0, dryRun: false });
    expect(back.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(back.err?.details).toBe('invalid secret "db-password": secret not found (it was removed)');
  });
});

describe('the store closes the race between removing a secret and a service starting to use it', () => {
  function setup(): { store: MemoryStore; sid: string; svc: Service } {
    const store = new MemoryStore(log);
    store.setProposer(new MemoryProposer(store));
    const sid = 'secretsecretsecretsecret1';
    store.applyBatch({ proposalId: 'p', proposedAt: 0, actions: [{ kind: 0, secret: { id: sid, meta: undefined, spec: { name: 'r', labels: {}, data: Buffer.from('v') } } } as never] }, 1);
    const svc = testService('user', 1);
    svc.spec!.task!.container!.secrets = [{ secretId: sid, secretName: 'r', file: { name: 'r', uid: 0, gid: 0, mode: 0o444 } }];
    return { store, sid, svc };
  }

  it('a removal applied first: the service naming it is refused', async () => {
    const { store, sid, svc } = setup();
    // both transactions run on the same state before either is applied
    const rm = store.update((tx) => tx.delete('secret', sid));
    const create = store.update((tx) => tx.create('service', svc));
    await rm;
    await expect(create).rejects.toThrow('invalid secret "r": secret not found (it was removed)');
    expect(store.services.size).toBe(0);
  });

  it('a service applied first: the removal is refused', async () => {
    const { store, sid, svc } = setup();
    const create = store.update((tx) => tx.create('service', svc));
    const rm = store.update((tx) => tx.delete('secret', sid));
    await create;
    await expect(rm).rejects.toThrow('secret "r" is in use by service user');
    expect(store.secrets.size).toBe(1);
    // writers that leave the references alone (orchestrators) are not refused
    await store.update((tx) => tx.update('service', { ...tx.get('service', svc.id)!, updateStatus: undefined }));
  });
});
