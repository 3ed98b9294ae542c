/** Spec diffs (for `service history` and `service update --dry-run`) and the tasks a new spec replaces. */
import { ServiceSpec, Task, TaskSpec, TaskState } from '../../gen/flotilla/v1/objects.js';

function flatten(prefix: string, v: unknown, out: Map<string, string>): void {
  if (v === undefined || v === null) return;
  if (Array.isArray(v)) {
    out.set(prefix, JSON.stringify(v));
    return;
  }
  if (typeof v === 'object') {
    for (const [k, x] of Object.entries(v as Record<string, unknown>)) flatten(prefix ? `${prefix}.${k}` : k, x, out);
    return;
  }
  out.set(prefix, JSON.stringify(v));
}

/** One line per changed field: "task.container.image: \"a\" -> \"b\"". */
export function diffSpecs(a: ServiceSpec | undefined, b: ServiceSpec | undefined): string[] {
  const fa = new Map<string, string>();
  const fb = new Map<string, string>();
  flatten('', a, fa);
  flatten('', b, fb);
  const keys = [...new Set([...fa.keys(), ...fb.keys()])].sort();
  const out: string[] = [];
  for (const k of keys) {
    const x = fa.get(k);
    const y = fb.get(k);
    if (x === y) continue;
    if (x === undefined) out.push(`+ ${k}: ${y}`);
    else if (y === undefined) out.push(`- ${k}: ${x}`);
    else out.push(`~ ${k}: ${x} -> ${y}`);
  }
  return out;
}

/** Compares by canonical protobuf encoding, so field order in memory does not matter. */
export function taskSpecEqual(a: TaskSpec | undefined, b: TaskSpec | undefined): boolean {
  const ea = Buffer.from(TaskSpec.encode(a ?? TaskSpec.fromPartial({})).finish());
  const eb = Buffer.from(TaskSpec.encode(b ?? TaskSpec.fromPartial({})).finish());
  return ea.equals(eb);
}

/** Live tasks whose spec differs from the new spec's task spec. */
export function tasksToReplace(tasks: Task[], next: ServiceSpec): Task[] {
  return tasks.filter((t) => t.desiredState <= TaskState.TASK_STATE_RUNNING && !taskSpecEqual(t.spec, next.task));
}
