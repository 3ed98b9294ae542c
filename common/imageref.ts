/**
 * Image references, by Docker's rules (used by the node's image store, the registry client in
 * agent/runtime/registry/ and the manager's spec validation):
 *
 *   [REGISTRY/]PATH[:TAG][@DIGEST]
 *
 * - REGISTRY is the first "/"-separated part when it contains "." or ":" or is "localhost"
 *   (host names, IPv4 addresses, an optional :port; "[::1]:5000" too); otherwise the registry is
 *   docker.io, and a one-part PATH gets "library/" in front ("busybox" -> docker.io/library/busybox).
 * - PATH components: lowercase letters and digits separated by ".", "_", "__" or dashes.
 * - TAG: 1-128 of [A-Za-z0-9_.-], not starting with "." or "-"; "latest" when neither tag nor digest is given.
 * - DIGEST: "sha256:" and 64 lowercase hex digits (the only algorithm flotilla verifies).
 *
 * The "familiar" form is what Docker shows and what the node's image store names images by:
 * docker.io/library/busybox -> busybox, docker.io/me/app -> me/app, 127.0.0.1:5000/app stays.
 */
import { invalidArgument } from './errors.js';

export const DEFAULT_REGISTRY = 'docker.io';
/** The key Docker uses for Docker Hub in config.json "auths". */
export const DOCKER_HUB_AUTH_KEY = 'https://index.docker.io/v1/';

export interface Reference {
  /** "docker.io", "127.0.0.1:5000", "registry.example.com" */
  registry: string;
  /** the repository path in the registry: "library/busybox", "app", "team/app" */
  repository: string;
  /** set when given, or "latest" when neither tag nor digest was given */
  tag?: string;
  /** "sha256:<hex>" when given */
  digest?: string;
}

const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const HOST_LABEL = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const DOMAIN_RE = new RegExp(`^(?:${HOST_LABEL}(?:\\.${HOST_LABEL})*|\\[[0-9a-fA-F:.]+\\])(?::[0-9]{1,5})?$`);
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;

/**
 * Parses an image reference; INVALID_ARGUMENT naming field and value when malformed.
 * `parseReference("127.0.0.1:5000/app:1")` -> { registry: "127.0.0.1:5000", repository: "app", tag: "1" }.
 */
export function parseReference(s: string, field = 'image reference'): Reference {
  const ref = s.trim();
  if (ref.length === 0) throw invalidArgument(field, s, 'empty');
  if (ref.length > 512) throw invalidArgument(field, s, 'longer than 512 characters');
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST_RE.test(digest)) throw invalidArgument(field, s, 'the digest must be "sha256:" followed by 64 lowercase hex digits');
  }
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG_RE.test(tag)) throw invalidArgument(field, s, 'the tag must be 1-128 letters, digits, "_", "." or "-", not starting with "." or "-"');
  }
  let registry = DEFAULT_REGISTRY;
  let repository = rest;
  const slash = rest.indexOf('/');
  if (slash > 0) {
    const first = rest.slice(0, slash);
    if (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('[')) {
      if (!DOMAIN_RE.test(first)) throw invalidArgument(field, s, `${JSON.stringify(first)} is not a valid registry host[:port]`);
      const port = /:([0-9]+)$/.exec(first)?.[1];
      if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) throw invalidArgument(field, s, `port ${port} is out of range`);
      registry = first;
      repository = rest.slice(slash + 1);
    }
  }
  if (registry === 'index.docker.io' || registry === 'registry-1.docker.io') registry = DEFAULT_REGISTRY;
  const parts = repository.split('/');
  if (repository === '' || !parts.every((p) => PATH_COMPONENT.test(p))) {
    throw invalidArgument(
      field,
      s,
      'the name must be lowercase letters, digits and the separators ".", "_", "-" and "/" (each part starting and ending with a letter or digit), after an optional registry host[:port]/',
    );
  }
  if (registry === DEFAULT_REGISTRY && parts.length === 1) repository = `library/${repository}`;
  if (registry.length + 1 + repository.length > 255) throw invalidArgument(field, s, 'the name is longer than 255 characters');
  if (tag === undefined && digest === undefined) tag = 'latest';
  return { registry, repository, ...(tag !== undefined ? { tag } : {}), ...(digest !== undefined ? { digest } : {}) };
}

/** "busybox", "me/app", "127.0.0.1:5000/app": the name Docker shows (no tag or digest). */
export function familiarName(ref: Pick<Reference, 'registry' | 'repository'>): string {
  if (ref.registry === DEFAULT_REGISTRY) return ref.repository.startsWith('library/') ? ref.repository.slice(8) : ref.repository;
  return `${ref.registry}/${ref.repository}`;
}

/** The fully qualified form: "docker.io/library/busybox:latest", "127.0.0.1:5000/app:1@sha256:...". */
export function formatReference(ref: Reference): string {
  return `${ref.registry}/${ref.repository}${ref.tag !== undefined ? `:${ref.tag}` : ''}${ref.digest !== undefined ? `@${ref.digest}` : ''}`;
}

/** The familiar form with tag and/or digest: "busybox:latest", "127.0.0.1:5000/app:1@sha256:...". */
export function familiarString(ref: Reference): string {
  return `${familiarName(ref)}${ref.tag !== undefined ? `:${ref.tag}` : ''}${ref.digest !== undefined ? `@${ref.digest}` : ''}`;
}

/**
 * The name the node's image store keeps an image under: "name:tag", or "name@digest" when a digest was
 * given (a digest names one immutable image; the tag beside it is informative only, as in Docker).
 */
export function storeName(ref: Reference): string {
  return ref.digest !== undefined ? `${familiarName(ref)}@${ref.digest}` : `${familiarName(ref)}:${ref.tag ?? 'latest'}`;
}

/** The host[:port] the registry's HTTP API is served on (Docker Hub's API lives on registry-1.docker.io). */
export function apiHost(registry: string): string {
  return registry === DEFAULT_REGISTRY ? 'registry-1.docker.io' : registry;
}

/** The key of a registry in config.json "auths" (Docker Hub's historical URL for docker.io). */
export function authKey(registry: string): string {
  return registry === DEFAULT_REGISTRY ? DOCKER_HUB_AUTH_KEY : registry;
}

/** Normalises what a user types after `login`/`logout` ("https://host:5000/", "docker.io") to a registry name. */
export function parseRegistryName(s: string, field = 'registry'): string {
  let r = s.trim().replace(/^https?:\/\//, '');
  r = r.replace(/\/v[12]\/?$/, '').replace(/\/+$/, '');
  if (r === 'index.docker.io' || r === 'registry-1.docker.io' || r === '') r = DEFAULT_REGISTRY;
  if (!DOMAIN_RE.test(r) || (!r.includes('.') && !r.includes(':') && r !== 'localhost')) {
    throw invalidArgument(field, s, 'expected a registry host[:port] such as registry.example.com or 127.0.0.1:5000');
  }
  return r;
}

/** Whether a registry is on this host's loopback (plain HTTP is allowed there, as Docker does). */
export function isLoopbackRegistry(registry: string): boolean {
  const host = registry.replace(/:[0-9]+$/, '');
  return host === 'localhost' || host === '[::1]' || /^127\.[0-9]+\.[0-9]+\.[0-9]+$/.test(host);
}
