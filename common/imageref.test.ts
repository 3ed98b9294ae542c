/**
 * Image references by Docker's rules, the credentials file, the WWW-Authenticate parser, platform choice,
 * and the manager accepting registry names in service specs.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ServiceSpec } from '../gen/flotilla/v1/objects.js';
import { validateServiceSpec } from '../manager/controlapi/validate.js';
import { choosePlatform, loadCredentials, parseChallenge, removeCredentials, saveCredentials } from '../agent/runtime/registry/index.js';
import { familiarString, formatReference, parseReference, parseRegistryName, storeName } from './imageref.js';

const D = `sha256:${'ab'.repeat(32)}`;

describe('parseReference', () => {
  it('applies the Docker Hub defaults and keeps registries with ports', () => {
    expect(parseReference('busybox')).toEqual({ registry: 'docker.io', repository: 'library/busybox', tag: 'latest' });
    expect(parseReference('me/app:1')).toEqual({ registry: 'docker.io', repository: 'me/app', tag: '1' });
    expect(parseReference('index.docker.io/library/busybox:1')).toEqual({ registry: 'docker.io', repository: 'library/busybox', tag: '1' });
    expect(parseReference('127.0.0.1:5000/app:1')).toEqual({ registry: '127.0.0.1:5000', repository: 'app', tag: '1' });
    expect(parseReference('localhost/a/b')).toEqual({ registry: 'localhost', repository: 'a/b', tag: 'latest' });
    expect(parseReference('[::1]:5000/app')).toEqual({ registry: '[::1]:5000', repository: 'app', tag: 'latest' });
    expect(parseReference('registry.example.com/team/app')).toEqual({ registry: 'registry.example.com', repository: 'team/app', tag: 'latest' });
    // "localhost:5000" alone is docker.io/library/localhost with tag 5000, as in Docker
    expect(parseReference('localhost:5000')).toEqual({ registry: 'docker.io', repository: 'library/localhost', tag: '5000' });
  });

  it('takes digests, with or without a tag', () => {
    expect(parseReference(`app@${D}`)).toEqual({ registry: 'docker.io', repository: 'library/app', digest: D });
    const r = parseReference(`127.0.0.1:5000/app:1@${D}`);
    expect(r).toEqual({ registry: '127.0.0.1:5000', repository: 'app', tag: '1', digest: D });
    expect(formatReference(r)).toBe(`127.0.0.1:5000/app:1@${D}`);
    expect(familiarString(parseReference('docker.io/library/busybox:1'))).toBe('busybox:1');
    expect(storeName(r)).toBe(`127.0.0.1:5000/app@${D}`);
    expect(storeName(parseReference('docker.io/me/app'))).toBe('me/app:latest');
  });

  it('refuses malformed references naming the value', () => {
    for (const bad of ['', 'App', 'a b', 'a:b:c', 'x/', 'x:', 'x:-bad', 'a@sha256:12', 'host:99999/app', 'a/Upper', 'a..b', `a@md5:${'0'.repeat(32)}`]) {
      expect(() => parseReference(bad), bad).toThrow(/invalid image reference/);
    }
  });

  it('normalises registry names for login/logout', () => {
    expect(parseRegistryName('https://127.0.0.1:5000/v2/')).toBe('127.0.0.1:5000');
    expect(parseRegistryName('index.docker.io')).toBe('docker.io');
    expect(() => parseRegistryName('notahost')).toThrow(/invalid registry/);
  });
});

describe('credentials file', () => {
  it('is Docker config.json layout, 0600, keeps other keys, reads Docker-style keys', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'flotilla-creds-'));
    try {
      const file = path.join(dir, 'sub', 'config.json');
      await saveCredentials('127.0.0.1:5000', { username: 'u', password: 'p:w' }, file);
      expect((await fs.stat(file)).mode & 0o777).toBe(0o600);
      expect((await fs.stat(path.dirname(file))).mode & 0o777).toBe(0o700);
      await fs.writeFile(file, JSON.stringify({ ...JSON.parse(await fs.readFile(file, 'utf8')), credsStore: 'x', auths: { ...JSON.parse(await fs.readFile(file, 'utf8')).auths, 'https://index.docker.io/v1/': { auth: Buffer.from('hub:secret').toString('base64') } } }));
      await saveCredentials('reg.example.com', { username: 'a', password: 'b' }, file);
      const cfg = JSON.parse(await fs.readFile(file, 'utf8'));
      expect(cfg.credsStore).toBe('x');
      expect(await loadCredentials('127.0.0.1:5000', file)).toEqual({ username: 'u', password: 'p:w' });
      expect(await loadCredentials('docker.io', file)).toEqual({ username: 'hub', password: 'secret' });
      expect(await removeCredentials('127.0.0.1:5000', file)).toBe(true);
      expect(await removeCredentials('127.0.0.1:5000', file)).toBe(false);
      expect(await loadCredentials('127.0.0.1:5000', file)).toBeUndefined();
      expect(await loadCredentials('reg.example.com', file)).toEqual({ username: 'a', password: 'b' });
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('protocol helpers', () => {
  it('parses WWW-Authenticate challenges', () => {
    expect(parseChallenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"')).toEqual({
      scheme: 'bearer',
      params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/busybox:pull' },
    });
    expect(parseChallenge('Basic realm="x"')).toEqual({ scheme: 'basic', params: { realm: 'x' } });
    expect(parseChallenge(null)).toBeUndefined();
  });

  it('chooses the platform entry of an index', () => {
    const e = (architecture: string, variant?: string): { digest: string; size: number; platform: { os: string; architecture: string; variant?: string } } => ({
      digest: `${architecture}${variant ?? ''}`,
      size: 1,
      platform: { os: 'linux', architecture, ...(variant ? { variant } : {}) },
    });
    const idx = [e('arm', 'v6'), e('arm', 'v7'), e('arm64', 'v8'), e('amd64')];
    expect(choosePlatform(idx, { os: 'linux', architecture: 'amd64' })?.digest).toBe('amd64');
    expect(choosePlatform(idx, { os: 'linux', architecture: 'arm', variant: 'v7' })?.digest).toBe('armv7');
    expect(choosePlatform([e('arm64')], { os: 'linux', architecture: 'arm64', variant: 'v8' })?.digest).toBe('arm64');
    expect(choosePlatform(idx, { os: 'linux', architecture: 'arm', variant: 'v5' })).toBeUndefined();
    expect(choosePlatform(idx, { os: 'windows', architecture: 'amd64' })).toBeUndefined();
  });
});

describe('service specs take registry references', () => {
  it('accepts host:port names and pinned digests, refuses malformed ones', () => {
    const spec = (image: string): ServiceSpec => ServiceSpec.fromPartial({ name: 'web', replicas: 1, task: { container: { image } } });
    for (const ok of ['busybox', '127.0.0.1:5000/app:1', `127.0.0.1:5000/app:1@${D}`, 'sha256:abcdef']) expect(() => validateServiceSpec(spec(ok)), ok).not.toThrow();
    for (const bad of ['App', 'a:b:c', 'x@sha256:1']) expect(() => validateServiceSpec(spec(bad)), bad).toThrow(/invalid image/);
  });
});
