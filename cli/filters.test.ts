/** The CLI's --filter, --format template and --since/--until parsing (pure functions, real objects). */
import { describe, expect, it } from 'vitest';
import { ServiceMode, Task, TaskState } from '../gen/flotilla/v1/objects.js';
import { testNode, testService } from '../testing/testutil.js';
import { serviceFilter, taskFilter } from './filters.js';
import { renderTemplate, serviceJson } from './format.js';
import { parseEventFilters, parseTime } from './commands/events.js';

describe('service ls --filter', () => {
  const web = testService('web', 2);
  web.spec!.labels = { tier: 'front', team: 'a' };
  const webapi = testService('webapi', 1);
  webapi.spec!.labels = { tier: 'back' };
  const job = testService('batch', 3);
  job.spec!.mode = ServiceMode.SERVICE_MODE_REPLICATED_JOB;
  const all = [web, webapi, job];
  const names = (filters: string[]) => all.filter(serviceFilter(filters)).map((s) => s.spec!.name);

  it('name and id match a prefix; values of one key are alternatives, keys must all match', () => {
    expect(names(['name=web'])).toEqual(['web', 'webapi']);
    expect(names(['name=webapi', 'name=batch'])).toEqual(['webapi', 'batch']);
    expect(names([`id=${web.id.slice(0, 6)}`])).toEqual(['web']);
    expect(names(['name=web', `id=${webapi.id}`])).toEqual(['webapi']);
  });

  it('label=KEY and label=KEY=VALUE (every label filter must match); mode', () => {
    expect(names(['label=tier'])).toEqual(['web', 'webapi']);
    expect(names(['label=tier=back'])).toEqual(['webapi']);
    expect(names(['label=tier', 'label=team=a'])).toEqual(['web']);
    expect(names(['mode=replicated-job'])).toEqual(['batch']);
    expect(names(['mode=replicated'])).toEqual(['web', 'webapi']);
  });

  it('refuses unknown keys and values, naming them', () => {
    expect(() => serviceFilter(['colour=red'])).toThrow(/invalid --filter "colour=red": supported keys: name, id, label, mode/);
    expect(() => serviceFilter(['mode=batch'])).toThrow(/invalid --filter mode "batch"/);
    expect(() => serviceFilter(['name'])).toThrow(/expected KEY=VALUE/);
  });
});

describe('service ps / node ps --filter', () => {
  const n1 = testNode('n1');
  const n2 = testNode('n2');
  const nodes = new Map([n1, n2].map((n) => [n.id, n] as const));
  const task = (id: string, service: string, slot: number, nodeId: string, desired: TaskState): Task =>
    Task.fromPartial({ id, serviceId: `${service}-id`, serviceName: service, slot, nodeId, desiredState: desired, status: { state: TaskState.TASK_STATE_RUNNING } });
  const tasks = [
    task('aaaa1', 'web', 1, n1.id, TaskState.TASK_STATE_RUNNING),
    task('aaaa2', 'web', 1, n1.id, TaskState.TASK_STATE_SHUTDOWN),
    task('bbbb1', 'web', 2, n2.id, TaskState.TASK_STATE_RUNNING),
    task('cccc1', 'job', 1, n2.id, TaskState.TASK_STATE_COMPLETE),
  ];
  const ids = (filters: string[]) => tasks.filter(taskFilter(filters, nodes)).map((t) => t.id);

  it('desired-state, node (hostname or id), name (task or service), id prefix, service', () => {
    expect(ids(['desired-state=running'])).toEqual(['aaaa1', 'bbbb1']);
    expect(ids(['desired-state=shutdown'])).toEqual(['aaaa2', 'cccc1']);
    expect(ids(['desired-state=complete'])).toEqual(['cccc1']);
    expect(ids(['desired-state=accepted'])).toEqual(['aaaa1', 'bbbb1']);
    expect(ids(['node=n2'])).toEqual(['bbbb1', 'cccc1']);
    expect(ids([`node=${n1.id}`])).toEqual(['aaaa1', 'aaaa2']);
    expect(ids(['name=web.1'])).toEqual(['aaaa1', 'aaaa2']);
    expect(ids(['name=web'])).toEqual(['aaaa1', 'aaaa2', 'bbbb1']);
    expect(ids(['id=aaaa'])).toEqual(['aaaa1', 'aaaa2']);
    expect(ids(['service=job'])).toEqual(['cccc1']);
    expect(ids(['node=n1', 'node=n2', 'desired-state=running'])).toEqual(['aaaa1', 'bbbb1']);
    expect(() => taskFilter(['desired-state=gone'], nodes)).toThrow(/invalid --filter desired-state "gone"/);
    expect(() => taskFilter(['image=x'], nodes)).toThrow(/supported keys: desired-state, node, name, id, service/);
  });
});

describe('--format templates', () => {
  it('paths (Docker case or ours), json, index; errors name the field', () => {
    const s = testService('web', 3);
    s.spec!.labels = { tier: 'front' };
    const j = serviceJson(s, 2);
    expect(renderTemplate('{{.Spec.Name}} {{.spec.replicas}} {{.ID}}', j)).toBe(`web 3 ${s.id}`);
    expect(renderTemplate('{{json .Spec.Labels}}', j)).toBe('{"tier":"front"}');
    expect(renderTemplate('{{index .Spec.Labels "tier"}}\\t{{.Mode}}', j)).toBe('front\treplicated');
    expect(renderTemplate('{{.Spec.Task.Placement.Preferences}}', j)).toBe('[]');
    expect(() => renderTemplate('{{.Spec.Nope}}', j)).toThrow(/no field "Nope"/);
    expect(() => renderTemplate('{{range .Spec}}', j)).toThrow(/cannot evaluate \{\{range \.Spec\}\}/);
  });
});

describe('events flags', () => {
  it('--since/--until: durations ago, RFC 3339, Unix seconds; bad values named', () => {
    const now = 1_800_000_000_000;
    expect(parseTime('--since', '10m', now)).toBe(now - 600_000);
    expect(parseTime('--since', '1h30m', now)).toBe(now - 5_400_000);
    expect(parseTime('--until', '2026-01-02T15:04:05Z', now)).toBe(Date.parse('2026-01-02T15:04:05Z'));
    expect(parseTime('--since', '1700000000', now)).toBe(1_700_000_000_000);
    expect(() => parseTime('--since', 'yesterday', now)).toThrow(/invalid --since "yesterday"/);
  });
  it('--filter type=, event=, service=', () => {
    expect(parseEventFilters(['type=service', 'type=task', 'event=remove', 'service=web'])).toEqual({ types: ['service', 'task'], actions: ['remove'], services: ['web'] });
    expect(() => parseEventFilters(['type=volume'])).toThrow(/invalid --filter type "volume"/);
    expect(() => parseEventFilters(['event=die'])).toThrow(/invalid --filter event "die"/);
    expect(() => parseEventFilters(['scope=swarm'])).toThrow(/supported keys: type, event, service/);
  });
});
