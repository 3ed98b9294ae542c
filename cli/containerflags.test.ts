/**
 * The container option flags without processes: each parser's one-line message naming the flag and
 * value, the update semantics (-add/-rm, Docker's cap-add/cap-drop rule), the control API's checks of a
 * spec built by hand, template expansion and the resolv.conf merge.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildServiceSpec } from './servicespec.js';
import { applyUpdate } from './update.js';
import { validateServiceSpec } from '../manager/controlapi/validate.js';
import { effectiveCaps, expandTemplate, parseMount, parseVolumeShort, readEnvFile } from '../common/containeropts.js';
import { mergeResolvConf } from '../agent/runtime/oci.js';

const build = (flags: Record<string, unknown>) => buildServiceSpec({ name: 's', ...flags }, 'busybox:latest', []);

describe('container option flags', () => {
  it('reject bad values with one line naming the flag and the value', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ sysctl: ['kernel.hostname=x'] }, /^invalid --sysctl "kernel\.hostname": not a namespaced sysctl/],
      [{ sysctl: ['net.core.somaxconn'] }, /^invalid --sysctl "net\.core\.somaxconn": expected KEY=VALUE/],
      [{ capAdd: ['NOPE'] }, /^invalid --cap-add "NOPE": unknown capability/],
      [{ ulimit: ['nofile=10:5'] }, /^invalid --ulimit "nofile=10:5": the soft limit cannot be above the hard limit/],
      [{ ulimit: ['files=1'] }, /^invalid --ulimit "files": unknown ulimit/],
      [{ stopSignal: 'SIGNOPE' }, /^invalid --stop-signal "SIGNOPE": unknown signal/],
      [{ hostname: '{{.Service.Nom}}' }, /^invalid --hostname .*unknown template field \.Service\.Nom/],
      [{ hostname: '{{.Service.Name' }, /^invalid --hostname .*malformed template/],
      [{ dns: ['not-an-ip'] }, /^invalid --dns "not-an-ip": a name server is an IP address/],
      [{ dnsOption: ['nd ots'] }, /^invalid --dns-option "nd ots"/],
      [{ host: ['nohost'] }, /^invalid --host "nohost": expected HOST:IP/],
      [{ host: ['db:999.1.1.1'] }, /^invalid --host "999\.1\.1\.1 db": expected an IP address and a host name/],
      [{ group: ['a b'] }, /^invalid --group "a b": expected a group name or GID/],
      [{ mount: ['type=bind,target=/x'] }, /^invalid --mount .*a bind mount needs a source/],
      [{ mount: ['type=bind,source=rel,target=/x'] }, /^invalid --mount "rel": the source of a bind mount must be an absolute host path/],
      [{ mount: ['type=volume,source=v,target=rel'] }, /^invalid --mount "rel": the target must be an absolute path/],
      [{ mount: ['type=volume,source=bad/name,target=/x'] }, /^invalid --mount "bad\/name": a volume name is/],
      [{ mount: ['type=nfs,target=/x'] }, /^invalid --mount "nfs": mount type must be volume, bind or tmpfs/],
      [{ mount: ['type=tmpfs,target=/x,tmpfs-mode=999'] }, /^invalid --mount "tmpfs-mode=999": tmpfs-mode is octal/],
      [{ mount: ['type=tmpfs,target=/x,volume-opt=o=size=1m'] }, /^invalid --mount .*volume-opt, volume-label and volume-nocopy are for type=volume/],
      [{ mount: ['type=volume,source=v,target=/x,volume-opt=foo=1'] }, /^invalid --mount "volume-opt=foo": the local driver takes type, device, o/],
      [{ mount: ['type=volume,source=v,target=/x,colour=red'] }, /^invalid --mount "colour=red": unknown mount option/],
      [{ mount: ['type=volume,source=a,target=/x', 'type=volume,source=b,target=/x/'] }, /^invalid --mount "\/x\/": two mounts have this target/],
      [{ envFile: ['/nonexistent/app.env'] }, /^invalid --env-file "\/nonexistent\/app\.env": no such file/],
    ];
    for (const [flags, want] of cases) {
      let msg = '';
      try {
        build(flags);
      } catch (err) {
        msg = (err as Error).message;
      }
      expect(msg, JSON.stringify(flags)).toMatch(want);
      expect(msg.split('\n')).toHaveLength(1);
    }
  });

  it('parse Docker mount syntaxes', () => {
    expect(parseMount('--mount', 'type=volume,src=data,dst=/data,ro,volume-opt=type=tmpfs,volume-opt=device=tmpfs,volume-opt="o=size=1m,uid=1",volume-label=a=b')).toMatchObject({
      type: 'volume',
      source: 'data',
      target: '/data',
      readonly: true,
      volumeOpts: { type: 'tmpfs', device: 'tmpfs', o: 'size=1m,uid=1' },
      volumeLabels: { a: 'b' },
    });
    expect(parseMount('--mount', 'type=tmpfs,target=/t,tmpfs-size=64m,tmpfs-mode=1770,readonly=false')).toMatchObject({ tmpfsSizeBytes: 64 * 1024 * 1024, tmpfsMode: 0o1770, readonly: false });
    expect(parseVolumeShort('-v', 'data:/data:ro')).toMatchObject({ type: 'volume', source: 'data', target: '/data', readonly: true });
    expect(parseVolumeShort('-v', '/srv:/srv')).toMatchObject({ type: 'bind', source: '/srv', target: '/srv' });
    expect(parseVolumeShort('-v', '/cache')).toMatchObject({ type: 'volume', source: '', target: '/cache' });
  });

  it('reads env files as Docker does; -e wins', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'flotilla-envfile-'));
    try {
      const f = path.join(dir, 'a.env');
      fs.writeFileSync(f, '# comment\n\nA=1\n  B=two words\nC\nD=x\n');
      process.env.C = 'from-env';
      expect(readEnvFile('--env-file', f)).toEqual(['A=1', 'B=two words', 'C=from-env', 'D=x']);
      expect(build({ envFile: [f], env: ['D=flag'] }).task!.container!.env).toEqual(['A=1', 'B=two words', 'C=from-env', 'D=x', 'D=flag']);
    } finally {
      delete process.env.C;
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('updates with -add/-rm and Docker cap semantics; the API accepts the result', () => {
    const spec = build({ capAdd: ['NET_ADMIN'], capDrop: ['CHOWN'], ulimit: ['nofile=1:2'], sysctl: ['net.ipv4.ip_forward=1'], host: ['a:10.0.0.1', 'a:10.0.0.2'], dns: ['192.0.2.1'], mount: ['type=volume,source=v,target=/v'] });
    const next = applyUpdate(spec, {
      capAdd: ['CHOWN'],
      capDrop: ['NET_ADMIN'],
      ulimitAdd: ['nofile=5'],
      sysctlRm: ['net.ipv4.ip_forward'],
      hostRm: ['a:10.0.0.1'],
      hostAdd: ['b:10.0.0.3'],
      dnsRm: ['192.0.2.1'],
      mountAdd: ['type=volume,source=w,target=/v'],
    });
    const c = next.task!.container!;
    expect(c.capAdd).toEqual(['CAP_CHOWN']);
    expect(c.capDrop).toEqual(['CAP_NET_ADMIN']);
    expect(c.ulimits).toEqual([{ name: 'nofile', soft: 5, hard: 5 }]);
    expect(c.sysctls).toEqual({});
    expect(c.hosts).toEqual(['10.0.0.2 a', '10.0.0.3 b']);
    expect(c.dnsConfig).toBeUndefined();
    expect(c.mounts.map((m) => m.source)).toEqual(['w']);
    expect(() => applyUpdate(spec, { mount: ['type=tmpfs,target=/t'] })).toThrow(/--mount .*service update takes --mount-add and --mount-rm/);
    expect(() => applyUpdate(spec, { hostRm: [], host: ['x:1.2.3.4'] })).toThrow(/service update takes --host-add and --host-rm/);
    expect(() => validateServiceSpec(next)).not.toThrow();
  });

  it('the control API checks a spec made without the CLI', () => {
    const bad = (edit: (c: NonNullable<NonNullable<ReturnType<typeof build>['task']>['container']>) => void): string => {
      const spec = build({});
      edit(spec.task!.container!);
      try {
        validateServiceSpec(spec);
        return '';
      } catch (err) {
        return (err as Error).message;
      }
    };
    expect(bad((c) => (c.sysctls = { 'kernel.panic': '1' }))).toMatch(/invalid sysctl "kernel\.panic"/);
    expect(bad((c) => {
      c.networkMode = 'host';
      c.sysctls = { 'net.core.somaxconn': '1' };
    })).toMatch(/net\.\* sysctls cannot be set with the host network/);
    expect(bad((c) => c.mounts.push({ type: 'bind', source: '/etc', target: '/', readonly: false, volumeOpts: {}, volumeLabels: {}, tmpfsSizeBytes: 0, tmpfsMode: 0, volumeNocopy: false }))).toMatch(/cannot mount over the root/);
    expect(bad((c) => (c.ulimits = [{ name: 'nofile', soft: 1, hard: 1 }, { name: 'nofile', soft: 2, hard: 2 }]))).toMatch(/ulimit "nofile": given twice/);
    expect(bad((c) => (c.stopSignal = 'BOGUS'))).toMatch(/invalid stop-signal "BOGUS"/);
    expect(bad((c) => (c.hosts = ['db 10.0.0.1']))).toMatch(/invalid host "db 10\.0\.0\.1"/);
    expect(bad((c) => (c.capDrop = ['cap_nope']))).toMatch(/invalid cap-drop "cap_nope"/);
  });

  it('expands hostname templates; computes capabilities as Docker does', () => {
    const ctx = { serviceId: 'sid', serviceName: 'web', taskId: 'tid', taskName: 'web.2.tid', taskSlot: '2', nodeId: 'nid', nodeHostname: 'h1' };
    expect(expandTemplate('{{.Service.Name}}-{{ .Task.Slot }}.{{.Node.Hostname}}', ctx)).toBe('web-2.h1');
    expect(expandTemplate('{{.Task.Name}}/{{.Node.ID}}/{{.Service.ID}}', ctx)).toBe('web.2.tid/nid/sid');
    expect(effectiveCaps(['CAP_CHOWN', 'CAP_KILL'], ['NET_ADMIN'], ['CHOWN'])).toEqual(['CAP_KILL', 'CAP_NET_ADMIN']);
    expect(effectiveCaps(['CAP_CHOWN', 'CAP_KILL'], ['KILL'], ['ALL'])).toEqual(['CAP_KILL']);
  });

  it('merges DNS options into resolv.conf', () => {
    const host = '# host\nnameserver 10.0.0.2\nsearch corp\noptions ndots:5 rotate\n';
    expect(mergeResolvConf(host, { nameservers: ['192.0.2.1'], search: ['a.test'], options: ['ndots:1'] }, false)).toBe('# host\nnameserver 192.0.2.1\nsearch a.test\noptions rotate ndots:1\n');
    // an overlay task keeps its networks' resolvers first
    expect(mergeResolvConf('nameserver 10.0.1.1\noptions ndots:0\n', { nameservers: ['192.0.2.1'] }, true)).toBe('nameserver 10.0.1.1\nnameserver 192.0.2.1\noptions ndots:0\n');
    expect(mergeResolvConf(host, undefined, false)).toBe(host);
  });
});
