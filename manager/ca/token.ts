/**
 * Join tokens: `FLTKN-1-<sha256 of the root CA certificate, 64 hex>-<secret, 32 base36>`.
 *
 * The digest lets a joining node check the CA it fetched over a not-yet-trusted connection (a
 * mismatch means a man in the middle, or a token from another cluster); the secret says which role
 * the node may join as. A token is a credential: never log it.
 */
import { randomBytes } from 'node:crypto';
import { FlotillaError } from '../../common/errors.js';
import { secretMatches } from '../../common/ids.js';
import { caDigest } from './x509.js';

const PREFIX = 'FLTKN';
const VERSION = '1';
const SECRET_LEN = 32;
const B36 = '0123456789abcdefghijklmnopqrstuvwxyz';
const TOKEN_RE = /^FLTKN-1-([0-9a-f]{64})-([0-9a-z]{32})$/;

export interface ParsedToken {
  caDigest: string;
  secret: string;
}

/** A fresh random secret (32 base36 characters, about 165 bits). */
export function newTokenSecret(): string {
  let out = '';
  while (out.length < SECRET_LEN) {
    for (const b of randomBytes(SECRET_LEN)) {
      if (b < 252 && out.length < SECRET_LEN) out += B36[b % 36]; // 252 = 7*36: no modulo bias
    }
  }
  return out;
}

/** The token for a root CA and a secret. */
export function formatToken(rootCaPem: string, secret: string): string {
  return `${PREFIX}-${VERSION}-${caDigest(rootCaPem)}-${secret}`;
}

/** Parses a token; the message names what is wrong without echoing the secret. */
export function parseToken(token: string): ParsedToken {
  const t = token.trim();
  const m = TOKEN_RE.exec(t);
  if (!m) {
    const parts = t.split('-');
    const why =
      parts[0] !== PREFIX ? `it must start with ${PREFIX}-${VERSION}-`
      : parts[1] !== VERSION ? `unsupported token version ${JSON.stringify(parts[1] ?? '')}`
      : 'expected FLTKN-1-<64 hex CA digest>-<32 character secret>';
    throw new FlotillaError('INVALID_ARGUMENT', `invalid join token: ${why}`);
  }
  return { caDigest: m[1]!, secret: m[2]! };
}

/**
 * Checks a fetched root CA certificate against the digest in a token. Throws a clear error on a
 * mismatch: the joining node must not trust that CA.
 */
export function verifyCaAgainstToken(token: string, rootCaPem: string): void {
  const { caDigest: want } = parseToken(token);
  const got = caDigest(rootCaPem);
  if (!secretMatches(got, want)) {
    throw new FlotillaError(
      'PERMISSION_DENIED',
      `the manager's root CA (sha256 ${got.slice(0, 12)}...) does not match the join token's CA digest (${want.slice(0, 12)}...): ` +
        'possible man in the middle, or a token from another cluster; check the --join address and the token',
    );
  }
}

/** Whether a token presented by a joining node is this one (constant-time on the whole token). */
export function tokenMatches(given: string, want: string): boolean {
  return secretMatches(given.trim(), want);
}

/** A short, non-secret fingerprint for logs and `cluster inspect` (never the secret). */
export function redactToken(token: string): string {
  const m = TOKEN_RE.exec(token.trim());
  return m ? `${PREFIX}-${VERSION}-${m[1]!.slice(0, 12)}...-<redacted>` : '<redacted>';
}
