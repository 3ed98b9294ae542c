/**
 * Placement constraints: `KEY==VALUE` or `KEY!=VALUE`, as in Docker Swarm.
 *
 *   node.id            the node's id
 *   node.hostname      the hostname the node reported
 *   node.role          manager | worker (the node's current role)
 *   node.labels.KEY    a user label (node.spec.labels, set with `node update --label-add`)
 *   engine.labels.KEY  a label the agent reported (node.description.engineLabels)
 *
 * Key prefixes are case-insensitive; label names are exact; values compare case-insensitively (as in
 * Docker). A label the node lacks reads as the empty string, so `node.labels.zone!=b` matches a node
 * with no zone label and `node.labels.zone==b` does not.
 */
import { Node, NodeRole } from '../../gen/flotilla/v1/objects.js';
import { invalidArgument } from '../../common/errors.js';

export type ConstraintField = 'node.id' | 'node.hostname' | 'node.role' | 'node.labels' | 'engine.labels';

export interface Constraint {
  /** The expression as written. */
  readonly expr: string;
  readonly field: ConstraintField;
  /** The label name for node.labels / engine.labels, '' otherwise. */
  readonly label: string;
  readonly op: '==' | '!=';
  /** The value as written (trimmed). */
  readonly value: string;
  /** Canonical text: KEY==VALUE without spaces around the operator. */
  readonly text: string;
}

const KEYS = 'node.id, node.hostname, node.role, node.labels.KEY or engine.labels.KEY';
const LABEL_RE = /^[^\s=!]+$/;

export function parseConstraint(expr: string): Constraint {
  if (typeof expr !== 'string') throw invalidArgument('constraint', expr, 'expected a string');
  const eq = expr.indexOf('==');
  const ne = expr.indexOf('!=');
  const at = eq < 0 ? ne : ne < 0 ? eq : Math.min(eq, ne);
  if (at < 0) throw invalidArgument('constraint', expr, 'expected KEY==VALUE or KEY!=VALUE');
  const op = expr.slice(at, at + 2) as '==' | '!=';
  const key = expr.slice(0, at).trim();
  const value = expr.slice(at + 2).trim();
  if (value.includes('==') || value.includes('!=')) throw invalidArgument('constraint', expr, 'more than one operator');
  if (!key) throw invalidArgument('constraint', expr, 'empty key');
  if (!value) throw invalidArgument('constraint', expr, 'empty value');
  if (/[=!]/.test(value)) throw invalidArgument('constraint', expr, 'the value may not contain "=" or "!"');

  let field: ConstraintField;
  let label = '';
  const lower = key.toLowerCase();
  if (lower === 'node.id' || lower === 'node.hostname' || lower === 'node.role') {
    field = lower;
  } else if (lower.startsWith('node.labels.') || lower.startsWith('engine.labels.')) {
    field = lower.startsWith('node.') ? 'node.labels' : 'engine.labels';
    label = key.slice(field.length + 1);
    if (!label) throw invalidArgument('constraint', expr, `empty label name after ${field}.`);
    if (!LABEL_RE.test(label)) throw invalidArgument('constraint', expr, `label name ${JSON.stringify(label)} may not contain spaces, "=" or "!"`);
  } else {
    throw invalidArgument('constraint', expr, `unknown key ${JSON.stringify(key)} (use ${KEYS})`);
  }
  if (/\s/.test(key)) throw invalidArgument('constraint', expr, 'the key may not contain spaces');
  if (field === 'node.role') {
    const v = value.toLowerCase();
    if (v !== 'manager' && v !== 'worker') throw invalidArgument('constraint', expr, 'node.role must be manager or worker');
  }
  const canonicalKey = label ? `${field}.${label}` : field;
  return { expr, field, label, op, value, text: `${canonicalKey}${op}${value}` };
}

/** The node's value for the constraint's key ('' when it has none). */
function nodeValue(c: Constraint, node: Node): string {
  switch (c.field) {
    case 'node.id':
      return node.id;
    case 'node.hostname':
      return node.description?.hostname ?? '';
    case 'node.role':
      return node.role === NodeRole.NODE_ROLE_MANAGER ? 'manager' : 'worker';
    case 'node.labels':
      return node.spec?.labels?.[c.label] ?? '';
    case 'engine.labels':
      return node.description?.engineLabels?.[c.label] ?? '';
  }
}

export function matchConstraint(c: Constraint, node: Node): boolean {
  const v = nodeValue(c, node);
  const equal = v === c.value || v.toLowerCase() === c.value.toLowerCase();
  return c.op === '==' ? equal : !equal;
}

/** True when the node satisfies every constraint. */
export function matchAll(cs: readonly Constraint[], node: Node): boolean {
  for (const c of cs) if (!matchConstraint(c, node)) return false;
  return true;
}

/**
 * A spread preference's descriptor (`--placement-pref spread=DESCRIPTOR`): node.labels.KEY,
 * engine.labels.KEY, node.id, node.hostname or node.role. Tasks are spread evenly over the values
 * nodes have for it; nodes without it form one more group (docs/scheduler.md).
 */
export interface Spread {
  readonly descriptor: string;
  readonly field: ConstraintField;
  readonly label: string;
}

export function parseSpread(descriptor: string, field = 'placement-pref'): Spread {
  if (typeof descriptor !== 'string' || !descriptor.trim()) throw invalidArgument(field, descriptor, 'expected spread=node.labels.KEY');
  const flag = field;
  const key = descriptor.trim();
  const lower = key.toLowerCase();
  if (lower === 'node.id' || lower === 'node.hostname' || lower === 'node.role') return { descriptor: key, field: lower, label: '' };
  if (lower.startsWith('node.labels.') || lower.startsWith('engine.labels.')) {
    const field: ConstraintField = lower.startsWith('node.') ? 'node.labels' : 'engine.labels';
    const label = key.slice(field.length + 1);
    if (!label || !LABEL_RE.test(label)) throw invalidArgument(flag, descriptor, `invalid label name after ${field}.`);
    return { descriptor: key, field, label };
  }
  throw invalidArgument(flag, descriptor, `unknown key ${JSON.stringify(key)} (use ${KEYS})`);
}

/** The node's value for a spread descriptor; undefined when the node has no such label. */
export function spreadValue(s: Spread, node: Node): string | undefined {
  switch (s.field) {
    case 'node.labels':
      return node.spec?.labels?.[s.label];
    case 'engine.labels':
      return node.description?.engineLabels?.[s.label];
    default:
      return nodeValue({ expr: '', field: s.field, label: '', op: '==', value: '', text: '' }, node);
  }
}

/** Parses the CLI's `spread=DESCRIPTOR` form (the only strategy, as in Swarm). */
export function parsePlacementPref(flag: string, v: string): string {
  const eq = v.indexOf('=');
  if (eq < 0 || v.slice(0, eq).trim() !== 'spread') throw invalidArgument(flag, v, 'expected spread=node.labels.KEY');
  return parseSpread(v.slice(eq + 1), flag).descriptor;
}
