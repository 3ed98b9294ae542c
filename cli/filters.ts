/**
 * `--filter KEY=VALUE` for `service ls`, `service ps` and `node ps`, as Docker does them: values of
 * one key are alternatives (OR), different keys must all match (AND). An unknown key or a bad value
 * is refused with one line naming it.
 */
import { Node, Service, Task, TaskState } from '../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../common/errors.js';
import { serviceModeName, taskName } from './format.js';

function parse(filters: string[], keys: readonly string[]): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const f of filters) {
    const i = f.indexOf('=');
    const k = i < 0 ? f : f.slice(0, i);
    const v = i < 0 ? '' : f.slice(i + 1);
    if (!keys.includes(k)) throw invalidArgument('--filter', f, `supported keys: ${keys.join(', ')}`);
    if (!v) throw invalidArgument('--filter', f, 'expected KEY=VALUE');
    out.set(k, [...(out.get(k) ?? []), v]);
  }
  return out;
}

const MODES = ['replicated', 'global', 'replicated-job', 'global-job'];

/** service ls: name=PREFIX, id=PREFIX, label=KEY or KEY=VALUE, mode=MODE. */
export function serviceFilter(filters: string[]): (s: Service) => boolean {
  const f = parse(filters, ['name', 'id', 'label', 'mode']);
  for (const m of f.get('mode') ?? []) if (!MODES.includes(m)) throw invalidArgument('--filter mode', m, `must be one of ${MODES.join(', ')}`);
  return (s) => {
    const name = s.spec?.name ?? '';
    const labels = s.spec?.labels ?? {};
    const any = (k: string, test: (v: string) => boolean): boolean => !f.has(k) || f.get(k)!.some(test);
    return (
      any('name', (v) => name.startsWith(v)) &&
      any('id', (v) => s.id.startsWith(v)) &&
      any('mode', (v) => serviceModeName(s.spec?.mode) === v) &&
      // every label filter must match (as Docker's)
      (f.get('label') ?? []).every((v) => {
        const i = v.indexOf('=');
        return i < 0 ? v in labels : labels[v.slice(0, i)] === v.slice(i + 1);
      })
    );
  };
}

const DESIRED = ['running', 'shutdown', 'accepted', 'complete'];

/** service ps / node ps: desired-state=running|shutdown|accepted|complete, node=NAME|ID, name=TASKNAME, id=PREFIX, service=NAME|ID. */
export function taskFilter(filters: string[], nodes: Map<string, Node>): (t: Task) => boolean {
  const f = parse(filters, ['desired-state', 'node', 'name', 'id', 'service']);
  for (const d of f.get('desired-state') ?? []) if (!DESIRED.includes(d)) throw invalidArgument('--filter desired-state', d, `must be ${DESIRED.join(', ')}`);
  return (t) => {
    const any = (k: string, test: (v: string) => boolean): boolean => !f.has(k) || f.get(k)!.some(test);
    const host = nodes.get(t.nodeId)?.description?.hostname;
    return (
      any('desired-state', (v) => {
        if (v === 'running') return t.desiredState === TaskState.TASK_STATE_RUNNING;
        if (v === 'accepted') return t.desiredState <= TaskState.TASK_STATE_RUNNING;
        if (v === 'complete') return t.desiredState === TaskState.TASK_STATE_COMPLETE;
        return t.desiredState > TaskState.TASK_STATE_RUNNING;
      }) &&
      any('node', (v) => t.nodeId === v || host === v || (v.length >= 4 && !!t.nodeId && t.nodeId.startsWith(v))) &&
      any('name', (v) => taskName(t, nodes) === v || taskName(t, nodes).startsWith(`${v}.`)) &&
      any('id', (v) => t.id.startsWith(v)) &&
      any('service', (v) => t.serviceName === v || t.serviceId.startsWith(v))
    );
  };
}
